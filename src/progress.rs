//! The shipper's progress on a terminal: a bar for the long cycles (initial copy, resync),
//! with log lines printed above it; delta cycles, and a shipper whose stderr is not a
//! terminal (a service), log a line every few seconds instead.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;
use vmreplica_common::wire::CycleKind;
use vmreplica_shipper::progress::{kind_label, LogProgress, Progress, Snapshot};

/// The bar being drawn, if any: shared by the progress sink and the log writer.
#[derive(Clone, Default)]
pub struct Bar(Arc<Mutex<Option<ProgressBar>>>);

impl Bar {
    fn current(&self) -> Option<ProgressBar> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, bar: Option<ProgressBar>) -> Option<ProgressBar> {
        std::mem::replace(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()), bar)
    }
}

/// stderr for the log: each line is written with the bar lifted out of its way.
impl<'a> MakeWriter<'a> for Bar {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine {
            buf: Vec::new(),
            bar: self.current(),
        }
    }
}

/// One log event, buffered and written whole when dropped.
pub struct LogLine {
    buf: Vec<u8>,
    bar: Option<ProgressBar>,
}

impl Write for LogLine {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let out = || {
            let _ = io::stderr().write_all(&self.buf);
        };
        match &self.bar {
            Some(b) => b.suspend(out),
            None => out(),
        }
    }
}

/// Draws the bar of each initial copy or resync; logs the progress of delta cycles.
pub struct Terminal {
    bar: Bar,
    log: LogProgress,
}

impl Terminal {
    pub fn new(bar: Bar) -> Terminal {
        Terminal {
            bar,
            log: LogProgress::default(),
        }
    }
}

/// The bar's layout: `rest` follows the bar and its percentage.
fn style(rest: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{{prefix}} [{{wide_bar}}] {{percent:>3}}% {rest}"))
        .expect("a valid template")
        .progress_chars("=> ")
}

impl Progress for Terminal {
    fn begin(&self, cycle: u64, kind: CycleKind, total: u64) {
        if kind == CycleKind::Delta {
            return self.log.begin(cycle, kind, total);
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
            .with_style(style(
                "{binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            ))
            .with_prefix(format!("cycle {cycle}, {}", kind_label(kind)));
        if let Some(old) = self.bar.set(Some(bar)) {
            old.abandon();
        }
    }

    fn update(&self, now: &Snapshot) {
        match self.bar.current() {
            Some(b) => b.set_position(now.done),
            None => self.log.update(now),
        }
    }

    fn sent(&self, now: &Snapshot) {
        match self.bar.current() {
            Some(b) => {
                b.set_position(now.done);
                b.set_style(style("{binary_total_bytes} sent, applying on the replica"));
            }
            None => self.log.sent(now),
        }
    }

    fn end(&self, applied: bool) {
        let Some(b) = self.bar.set(None) else {
            return self.log.end(applied);
        };
        if applied {
            b.set_style(style("{binary_total_bytes} in {elapsed}, applied"));
            b.finish();
        } else {
            b.set_style(style("interrupted, resumes without resending what arrived"));
            b.abandon();
        }
        // The bar stays on screen; what is logged next starts below it.
        let _ = io::stderr().write_all(b"\n");
    }
}

/// The progress sink for a shipper: the bar on a terminal, log lines elsewhere.
pub fn sink(bar: Bar) -> Arc<dyn Progress> {
    if io::IsTerminal::is_terminal(&io::stderr()) {
        Arc::new(Terminal::new(bar))
    } else {
        Arc::new(LogProgress::default())
    }
}
