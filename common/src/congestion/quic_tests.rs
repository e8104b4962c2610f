//! `vmr` inside real quinn connections on loopback: data crosses, the endpoint's book learns
//! the path, and the next connection to the same address starts from it.

use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::Controller;

use super::{Phase, VmrController};
use crate::link::{client, server, Congestion, Tuning};
use crate::tls::{init_ca, issue, Identity, Validity};

fn phase(c: Box<dyn Controller>) -> Option<Phase> {
    c.into_any()
        .downcast::<VmrController>()
        .ok()
        .map(|v| v.core.phase())
}

#[tokio::test]
async fn a_reconnect_resumes_from_the_path_the_last_connection_measured() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    init_ca(&ca, "congestion test CA", 1).unwrap();
    let id = |name: &str| {
        let ips = ["127.0.0.1".parse().unwrap()];
        let (c, k) = issue(&ca, name, &ips, Validity::days(1), dir.path()).unwrap();
        Identity::load(&c, &k, &ca.join("ca.pem")).unwrap()
    };
    let t = Tuning {
        congestion: Congestion::Vmr,
        ..Tuning::default()
    };
    let srv = server("127.0.0.1:0".parse().unwrap(), &id("replica-1"), &t, None).unwrap();
    let cli = client("127.0.0.1:0".parse().unwrap(), &id("primary-1"), &t).unwrap();
    let addr = srv.local_addr().unwrap();
    // The server drains every stream it is given.
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (srv, received) = (srv.clone(), Arc::clone(&received));
        tokio::spawn(async move {
            while let Some(inc) = srv.accept().await {
                let conn = inc.await.unwrap();
                let received = Arc::clone(&received);
                tokio::spawn(async move {
                    while let Ok((_, mut r)) = conn.accept_bi().await {
                        while let Ok(Some(c)) = r.read_chunk(1 << 20, true).await {
                            received.fetch_add(
                                c.bytes.len() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                    }
                });
            }
        });
    }
    assert!(cli.paths().get(addr, std::time::Instant::now()).is_none());
    let conn = cli.connect(addr, "replica-1").unwrap().await.unwrap();
    assert_eq!(phase(conn.congestion_state()), Some(Phase::Startup));
    let (mut s, _r) = conn.open_bi().await.unwrap();
    let block = bytes::Bytes::from(vec![7u8; 1 << 20]);
    for _ in 0..64 {
        s.write_chunk(block.clone()).await.unwrap();
    }
    s.finish().unwrap();
    for _ in 0..200 {
        if received.load(std::sync::atomic::Ordering::Relaxed) == 64 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        received.load(std::sync::atomic::Ordering::Relaxed),
        64 << 20
    );
    let hint = cli
        .paths()
        .get(addr, std::time::Instant::now())
        .expect("the book learnt the path");
    assert!(
        hint.bw > 0 && hint.min_rtt < Duration::from_secs(1),
        "{hint:?}"
    );
    conn.close(0u32.into(), b"done");

    let again = cli.connect(addr, "replica-1").unwrap().await.unwrap();
    assert!(
        matches!(
            phase(again.congestion_state()),
            Some(Phase::Resume { .. } | Phase::Cruise | Phase::Down | Phase::Up)
        ),
        "the second connection did not start from the remembered path"
    );
    again.close(0u32.into(), b"done");
}
