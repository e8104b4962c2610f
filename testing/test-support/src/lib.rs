//! Helpers the crates' integration tests share (a dev-dependency only; nothing here ships).

/// Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the calling thread (tests run as
/// root), so that file and directory permissions apply to it: a directory made writable but
/// not readable then lets a rename in but cannot be opened (nor fsynced). The other threads
/// of the process keep their capabilities.
pub fn drop_dac_override() {
    // Capability numbers (linux/capability.h).
    const CAP_DAC_OVERRIDE: u32 = 1;
    const CAP_DAC_READ_SEARCH: u32 = 2;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget and capset with a version-3 header (pid 0: this thread) and the two
    // data words that version reads and writes; both live across the calls.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
        d[0].effective &= !((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH));
        assert_eq!(libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()), 0);
    }
}
