use super::*;
use crate::k8s::reflect::Freshen;

#[tokio::test(start_paused = true)]
async fn a_broken_watch_is_timed_until_it_is_healthy_again() {
    let mut o: Observed<()> = Observed::default();
    assert_eq!(o.broken_for(), None);
    o.freshen(&Freshen::Broken("watch"));
    tokio::time::advance(Duration::from_secs(4)).await;
    o.freshen(&Freshen::Silent(Instant::now()));
    tokio::time::advance(Duration::from_secs(7)).await;
    assert!(
        o.broken_for() >= Some(WATCH_DOWN_GRACE),
        "from the first break"
    );
    o.freshen(&Freshen::Healthy);
    assert_eq!(o.broken_for(), None);
    // A write's answer is not the watch's word.
    let key: Key = (Arc::from("ns"), Arc::from("istio.a"));
    let seen = Seen {
        uid: "u".into(),
        resource_version: "1".into(),
        facts: (),
    };
    o.note_written(key.clone(), seen.clone());
    assert!(!o.confirmed(&key));
    o.upsert(key.clone(), seen);
    assert!(o.confirmed(&key));
}
