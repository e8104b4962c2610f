//! Pins the status schema (`vmreplica-status`, version 1): a report with every field set is
//! serialised and compared with `tests/status-v1.json`. A difference means the schema
//! changed: within version 1 fields may only be added (update the file and the README's
//! "Status and health"); renaming, removing or changing a field's meaning is version 2.

use vmreplica_ops::history::LastHour;
use vmreplica_ops::status::*;

fn sample() -> Report {
    let vm = VmStatus {
        vm: "vm1".into(),
        site: Site::Primary,
        role: "primary".into(),
        state: State::InitialCopy,
        health: Health {
            level: Level::Warning,
            reasons: vec!["the initial copy has not finished: no recovery point yet".into()],
        },
        progress: Some(Progress {
            cycle: 1,
            kind: "initial".into(),
            phase: "sending".into(),
            done_bytes: 512 << 20,
            total_bytes: 2048 << 20,
            percent: 25.0,
            rate_bytes_per_second: 134217728.0,
            eta_seconds: Some(12),
        }),
        lineage: Some("4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c".into()),
        interval_seconds: Some(300),
        rpo_limit_seconds: 3600,
        rpo_seconds: Some(42),
        last_cycle: Some(17),
        latest_point: Some(Point {
            cycle: 17,
            time: 1_796_300_000,
            age_seconds: 40,
            kind: "delta".into(),
            app_consistent: true,
        }),
        points: Some(12),
        backlog_bytes: Some(1 << 20),
        last_hour: LastHour {
            cycles_done: 11,
            cycles_expected: Some(11),
            cycles_missed: 0,
            avg_cycle_bytes: 3 << 20,
            peak_cycle_bytes: 9 << 20,
            avg_cycle_seconds: 1.25,
            peak_cycle_seconds: 3.5,
            bytes: 33 << 20,
            wire_bytes: 16 << 20,
        },
        total_cycles: 17,
        total_bytes: 4 << 30,
        total_wire_bytes: 2 << 30,
        compression_ratio: Some(2.0),
        link_rate_bytes_per_second: Some(45e6),
        bandwidth_limit_bytes_per_second: Some(50 << 20),
        compression: Some(true),
        last_error: Some("connecting to 192.0.2.10:7443: timed out".into()),
        last_error_time: Some(1_796_299_000),
        app_consistent: AppConsistent {
            every_seconds: Some(3600),
            last_time: Some(1_796_299_900),
            last_cycle: Some(16),
            last_frozen_ms: Some(12),
            last_error: None,
        },
        disks: vec![
            DiskStatus {
                name: "sys".into(),
                size: 20 << 30,
                excluded: false,
                dirty_bytes: Some(1 << 20),
                resync_required: false,
            },
            DiskStatus {
                name: "swap".into(),
                size: 4 << 30,
                excluded: true,
                dirty_bytes: None,
                resync_required: false,
            },
        ],
        processes: vec![Process {
            role: "shipper".into(),
            pid: 1234,
            socket: Some("/var/lib/vmreplica/vm1/shipper.sock".into()),
        }],
        // Replica-site fields (null or empty on the primary), set here so the file shows them.
        failover: Some(FailoverStatus {
            sub_state: "awaiting-commit".into(),
            point: 17,
            since: 1_796_300_010,
            lineage: Some("0a1b2c3d4e5f60718293a4b5c6d7e8f9".into()),
        }),
        test_failovers: vec![TestFailoverStatus {
            point: 16,
            since: 1_796_299_950,
            disks: vec![TestDisk {
                disk: "sys".into(),
                uri: "nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/tests/16/nbd.sock".into(),
                tcp_uri: Some("nbds://192.0.2.20:10809/sys".into()),
            }],
            vm_pid: Some(4321),
            error: None,
        }],
        paused_since: Some(1_796_299_990),
    };
    Report::new("primary-1".into(), 1_796_300_040, vec![vm])
}

#[test]
fn the_status_schema_is_pinned() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/status-v1.json");
    let now = serde_json::to_string_pretty(&sample()).unwrap() + "\n";
    if std::env::var_os("VMREPLICA_BLESS").is_some() {
        std::fs::write(&golden, &now).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    assert_eq!(
        now,
        want,
        "the status JSON changed: within version 1 only add fields (update {} and the README), \
         anything else is version 2",
        golden.display()
    );
    // Readers of version 1 read it back, and the envelope says what it is.
    let back: Report = serde_json::from_str(&want).unwrap();
    assert_eq!((back.schema.as_str(), back.version), (SCHEMA, 1));
    assert_eq!(back, sample());
}
