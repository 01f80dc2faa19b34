//! mDNS for real on this machine: an announcement is seen by a browser with the node's port and
//! TXT values, and its goodbye is heard when the announcer is dropped. Runs on whatever
//! interfaces the machine has (loopback included), so it needs no network beyond this host.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use exo_protocol::discovery::{Announcement, Announcer, Browser, Sighting};
use exo_protocol::{KvLayout, ModelFingerprint, Role};

async fn until(browser: &Browser, what: impl Fn(&Sighting) -> bool) -> Sighting {
    let wait = async {
        loop {
            if let Some(s) = browser.next().await.filter(|s| what(s)) {
                return s;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("no such sighting within 20 s")
}

#[tokio::test]
async fn a_node_is_seen_and_its_goodbye_heard() {
    let name = format!("test-node-{}", std::process::id());
    let announcement = Announcement {
        name: name.clone(),
        role: Role::Decode,
        port: 40_123,
        fingerprint: ModelFingerprint([3; 32]),
        layout: KvLayout::default(),
        version: "0.1.0".into(),
        tls: false,
    };
    let browser = Browser::start(&[]).unwrap();
    let announcer = Announcer::start(&announcement, "exo-test-host", &[]).unwrap();
    let seen = until(
        &browser,
        |s| matches!(s, Sighting::Seen { announcement: a, .. } if a.name == name),
    )
    .await;
    let Sighting::Seen {
        announcement: got,
        addrs,
    } = seen
    else {
        unreachable!()
    };
    assert_eq!(got, announcement);
    assert!(
        !addrs.is_empty() && addrs.iter().all(|a| a.port() == 40_123),
        "{addrs:?}"
    );
    eprintln!("seen at {addrs:?}");
    drop(announcer);
    until(
        &browser,
        |s| matches!(s, Sighting::Gone { name: n } if *n == name),
    )
    .await;
}
