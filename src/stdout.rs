//! The CLI's standard output. `println!` and `print!` are shadowed in this crate by the
//! macros below: a reader that goes away early (`vmreplica events | head -3`,
//! `vmreplica status | grep -q Critical`) ends the command quietly with exit status 141,
//! as a pipe's writer killed by SIGPIPE would, instead of std's panic ("failed printing to
//! stdout"). SIGPIPE itself stays ignored (Rust's default), so a write to a socket whose
//! peer died is still an error with a message, never a silent death.

use std::fmt;
use std::io::{self, Write};

/// The exit status of a process killed by SIGPIPE (128 + 13), what shells expect of a
/// writer whose reader left.
const READER_GONE: i32 = 141;

/// `print!`: writes `args` to standard output, ending the process if it cannot.
pub fn write(args: fmt::Arguments<'_>, newline: bool) {
    let mut out = io::stdout().lock();
    let r = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")
        } else {
            out.flush()
        }
    });
    if let Err(e) = r {
        failed(e)
    }
}

fn failed(e: io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(READER_GONE);
    }
    eprintln!("error: writing to standard output: {e}");
    std::process::exit(1);
}

/// std's `println!`, ending the process quietly when standard output's reader is gone.
macro_rules! println {
    () => {
        $crate::stdout::write(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*), true)
    };
}

/// std's `print!`, ending the process quietly when standard output's reader is gone.
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*), false)
    };
}
