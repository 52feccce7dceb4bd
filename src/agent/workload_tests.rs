use super::*;

#[test]
fn renewal_point_spreads_within_the_jitter_and_stays_before_expiry() {
    let p = RotationPolicy::default();
    let life = Duration::from_secs(3600);
    assert_eq!(p.renew_after(life, 0.5), Duration::from_secs(1800));
    assert_eq!(p.renew_after(life, 0.0), Duration::from_secs(1620));
    assert!(p.renew_after(life, 0.999_999) <= Duration::from_secs(1980));
    let late = RotationPolicy {
        fraction: 0.99,
        jitter: 0.5,
        ..RotationPolicy::default()
    };
    assert_eq!(
        late.renew_after(life, 0.99),
        Duration::from_secs(3240),
        "never past 90% of the lifetime"
    );
    assert_eq!(
        p.renew_after(Duration::ZERO, 0.5),
        MIN_RENEWAL_INTERVAL,
        "no tight loop on a nearly expired leaf"
    );
    assert_eq!(
        p.renew_after(Duration::from_millis(500), 0.5),
        MIN_RENEWAL_INTERVAL
    );
    // A fleet of 1,000 agents started together spreads out.
    let points: Vec<Duration> = (0..1000)
        .map(|_| p.renew_after(life, unit_random()))
        .collect();
    let (min, max) = (points.iter().min().unwrap(), points.iter().max().unwrap());
    assert!(
        *max - *min > Duration::from_secs(300),
        "spread {:?}",
        *max - *min
    );
}

#[test]
fn backoff_doubles_to_the_cap_with_jitter() {
    let p = RotationPolicy::default();
    assert_eq!(p.backoff(0, 0.0), Duration::from_millis(100));
    assert_eq!(p.backoff(0, 1.0), Duration::from_millis(200));
    assert_eq!(p.backoff(3, 1.0), Duration::from_millis(1600));
    assert_eq!(p.backoff(30, 1.0), Duration::from_secs(30));
    assert_eq!(p.backoff(30, 0.0), Duration::from_secs(15));
    // Near expiry the retries speed up, never below the initial delay.
    assert_eq!(
        p.retry_delay(30, 1.0, Some(Duration::from_secs(3600))),
        Duration::from_secs(30)
    );
    assert_eq!(
        p.retry_delay(30, 1.0, Some(Duration::from_secs(8))),
        Duration::from_secs(2)
    );
    assert_eq!(
        p.retry_delay(30, 1.0, Some(Duration::ZERO)),
        Duration::from_millis(200)
    );
    assert_eq!(p.retry_delay(30, 1.0, None), Duration::from_secs(30));
}

mod files {
    use super::super::{OUTPUT_DATA_LINK, publish_files};
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn sets(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != OUTPUT_DATA_LINK)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_set_is_published_behind_one_link_and_the_previous_one_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out/web");
        // What an older agent left: regular files.
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["key.pem", "cert-chain.pem", "root-cert.pem"] {
            std::fs::write(dir.join(f), "old").unwrap();
        }
        publish_files(&dir, b"key 1", b"chain 1", b"roots 1").unwrap();
        let first = sets(&dir);
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(
            std::fs::read_link(dir.join(OUTPUT_DATA_LINK)).unwrap(),
            Path::new(&first[0])
        );
        for (f, want) in [
            ("key.pem", "key 1"),
            ("cert-chain.pem", "chain 1"),
            ("root-cert.pem", "roots 1"),
        ] {
            assert_eq!(
                std::fs::read_link(dir.join(f)).unwrap(),
                Path::new(OUTPUT_DATA_LINK).join(f),
                "{f} is a link into ..data"
            );
            assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), want);
        }
        assert_eq!(mode(&dir.join("key.pem")), 0o600);
        assert_eq!(mode(&dir.join("cert-chain.pem")), 0o644);
        assert_eq!(mode(&dir.join(&first[0])), 0o700);

        publish_files(&dir, b"key 2", b"chain 2", b"roots 2").unwrap();
        let second = sets(&dir);
        assert_eq!(second.len(), 1, "the previous set is removed: {second:?}");
        assert_ne!(second, first);
        assert_eq!(
            std::fs::read_to_string(dir.join("key.pem")).unwrap(),
            "key 2"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
            "roots 2"
        );
        // Nothing else is left behind: the set, the link, the three names.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 5);
    }

    /// Readers resolving `..data` once (directly, or by checking it did not
    /// move while they opened the visible names) never see a key of one
    /// set with the chain of another, through hundreds of swaps.
    #[test]
    fn readers_never_see_a_key_with_another_sets_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("web");
        publish_files(&dir, b"0", b"0", b"0").unwrap();
        assert_eq!(mode(&dir), 0o700, "a directory the writer makes");
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut consistent, mut straddled, mut pinned) = (0u32, 0u32, 0u32);
                let mut loops = 0u32;
                while !stop.load(Ordering::Relaxed) && loops < 1_000_000 {
                    loops += 1;
                    let before = std::fs::read_link(dir.join(OUTPUT_DATA_LINK)).unwrap();
                    let key = std::fs::read_to_string(dir.join("key.pem"));
                    let chain = std::fs::read_to_string(dir.join("cert-chain.pem"));
                    let after = std::fs::read_link(dir.join(OUTPUT_DATA_LINK)).unwrap();
                    if before != after {
                        straddled += 1;
                    } else {
                        let (key, chain) = (key.unwrap(), chain.unwrap());
                        assert_eq!(key, chain, "a key with another set's chain");
                        consistent += 1;
                    }
                    // Through the resolved directory: whole, or gone.
                    let set = dir.join(&after);
                    if let (Ok(k), Ok(c)) = (
                        std::fs::read_to_string(set.join("key.pem")),
                        std::fs::read_to_string(set.join("cert-chain.pem")),
                    ) {
                        assert_eq!(k, c, "a set changed after it was published");
                        pinned += 1;
                    }
                }
                (consistent, straddled, pinned)
            })
        };
        for i in 1..=300u32 {
            let n = i.to_string();
            publish_files(&dir, n.as_bytes(), n.as_bytes(), n.as_bytes()).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let (consistent, straddled, pinned) = reader.join().unwrap();
        assert!(consistent > 0 && pinned > 0, "{consistent} {pinned}");
        eprintln!("{consistent} consistent reads, {straddled} straddled a swap, {pinned} pinned");
        assert_eq!(sets(&dir).len(), 1);
        assert_eq!(std::fs::read_to_string(dir.join("key.pem")).unwrap(), "300");
    }
}

/// Clock jumps, under tokio's paused clock: the wall clock of the agent and
/// of a scripted CA are tokio's elapsed time plus offsets a test moves.
mod clock {
    use super::*;
    use crate::ca::{Authority, check_csr};
    use crate::identity::TrustDomain;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

    const HOUR: Duration = Duration::from_secs(3600);

    struct Clocks {
        base: SystemTime,
        start: Instant,
        /// Seconds added to the agent's wall clock, and to the CA's.
        agent: AtomicI64,
        ca: AtomicI64,
    }

    impl Clocks {
        fn read(&self, offset: &AtomicI64) -> SystemTime {
            let t = self.base + self.start.elapsed();
            let off = offset.load(Ordering::SeqCst);
            if off >= 0 {
                t + Duration::from_secs(off.unsigned_abs())
            } else {
                t - Duration::from_secs(off.unsigned_abs())
            }
        }

        /// Both clocks jump by `secs`.
        fn jump(&self, secs: i64) {
            self.agent.fetch_add(secs, Ordering::SeqCst);
            self.ca.fetch_add(secs, Ordering::SeqCst);
        }
    }

    struct ScriptedCa {
        clocks: Arc<Clocks>,
        authority: Authority,
        down: AtomicBool,
        signed: AtomicU32,
    }

    impl CaClient for ScriptedCa {
        fn sign(
            &self,
            csr_pem: String,
            ttl: Duration,
        ) -> super::super::super::client::SignFuture<'_> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(Error::Ca {
                        code: tonic::Code::Unavailable,
                        message: "down".into(),
                    });
                }
                let csr = check_csr(csr_pem.as_bytes())?;
                let id = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web")
                    .map_err(|e| Error::Config(e.to_string()))?;
                let now = self.clocks.read(&self.clocks.ca);
                let issued = self.authority.sign_leaf(&csr, &id, ttl, now)?;
                self.signed.fetch_add(1, Ordering::SeqCst);
                Ok((issued.chain, None))
            })
        }
    }

    type Published = Arc<Mutex<Vec<(Arc<WorkloadCert>, SystemTime)>>>;

    struct Run {
        clocks: Arc<Clocks>,
        ca: Arc<ScriptedCa>,
        watch: CertWatch,
        metrics: Arc<AgentMetrics>,
        /// Every certificate published, with the agent's wall clock then.
        published: Published,
        _stop: watch::Sender<bool>,
    }

    /// A manager for one-hour certificates renewed at half their life (no
    /// jitter), against a CA whose root was made a day before the start.
    async fn start() -> Run {
        let real = SystemTime::now();
        let td = TrustDomain::new("cluster.local").unwrap();
        let made = real - 24 * HOUR;
        let files =
            Authority::generate_root(&td, KeyAlgorithm::EcdsaP256, 30 * 24 * HOUR, made).unwrap();
        let authority = Authority::from_files(&files, &td, made).unwrap();
        let clocks = Arc::new(Clocks {
            base: real,
            start: Instant::now(),
            agent: AtomicI64::new(0),
            ca: AtomicI64::new(0),
        });
        let ca = Arc::new(ScriptedCa {
            clocks: clocks.clone(),
            authority,
            down: AtomicBool::new(false),
            signed: AtomicU32::new(0),
        });
        let metrics = Arc::new(AgentMetrics::new().unwrap());
        let policy = RotationPolicy {
            ttl: HOUR,
            jitter: 0.0,
            ..RotationPolicy::default()
        };
        let (manager, watch) = CertManager::new("web", ca.clone(), policy, metrics.clone());
        let wall = clocks.clone();
        let manager = manager.with_wall_clock(Arc::new(move || wall.read(&wall.agent)));
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(manager.run(stop_rx));
        let published = Arc::new(Mutex::new(Vec::new()));
        {
            let (mut rx, published, clocks) =
                (watch.cert.clone(), published.clone(), clocks.clone());
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    if let Some(c) = rx.borrow_and_update().clone() {
                        let wall = clocks.read(&clocks.agent);
                        published.lock().unwrap().push((c, wall));
                    }
                }
            });
        }
        let run = Run {
            clocks,
            ca,
            watch,
            metrics,
            published,
            _stop: stop,
        };
        run.settle(Duration::from_secs(1)).await;
        assert!(run.serial().is_some(), "a first certificate");
        run
    }

    impl Run {
        fn serial(&self) -> Option<String> {
            self.watch
                .cert
                .borrow()
                .as_ref()
                .map(|c| c.serial_hex.clone())
        }

        fn signed(&self) -> u32 {
            self.ca.signed.load(Ordering::SeqCst)
        }

        async fn settle(&self, d: Duration) {
            tokio::time::sleep(d).await;
        }

        /// Nothing was ever published that the agent's wall clock called
        /// not yet valid or expired at that moment.
        fn assert_all_published_valid(&self) {
            for (c, wall) in self.published.lock().unwrap().iter() {
                let (_, leaf) =
                    x509_parser::certificate::X509Certificate::from_der(&c.leaf_der).unwrap();
                let nb = crate::ca::bundle::time_from_unix(leaf.validity().not_before.timestamp());
                assert!(
                    nb <= *wall && *wall < c.not_after,
                    "{} published outside its validity",
                    c.serial_hex
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_forward_jump_past_the_renewal_point_renews_and_past_expiry_withdraws() {
        let run = start().await;
        let first = run.serial();
        run.settle(Duration::from_secs(60)).await;
        assert_eq!(
            (run.serial(), run.signed()),
            (first.clone(), 1),
            "not due yet"
        );

        // 40 minutes forward: past the renewal point (30 min), not expiry.
        run.clocks.jump(40 * 60);
        run.settle(WALL_CLOCK_CHECK + Duration::from_secs(1)).await;
        let second = run.serial();
        assert!(
            second.is_some() && second != first,
            "renewed after the jump"
        );
        assert_eq!(run.signed(), 2);

        // Two hours forward with the CA away: the certificate has expired
        // by the wall clock, so it is withdrawn...
        run.ca.down.store(true, Ordering::SeqCst);
        run.clocks.jump(2 * 3600);
        run.settle(WALL_CLOCK_CHECK + Duration::from_secs(1)).await;
        assert!(
            run.serial().is_none(),
            "an expired certificate is not served"
        );
        assert!(run.metrics.csr_failures.with_label_values(&["web"]).get() >= 1);
        // ...and the CA's return brings a valid one.
        run.ca.down.store(false, Ordering::SeqCst);
        run.settle(Duration::from_secs(60)).await;
        assert!(run.serial().is_some() && run.serial() != second);
        run.assert_all_published_valid();
    }

    #[tokio::test(start_paused = true)]
    async fn a_backward_jump_neither_delays_renewal_nor_serves_a_leaf_not_yet_valid() {
        let run = start().await;
        let first = run.serial();
        // Both clocks six hours back: renewal stays due 30 minutes after
        // issuance on tokio's clock, not six and a half hours later.
        run.clocks.jump(-6 * 3600);
        run.settle(Duration::from_secs(29 * 60)).await;
        assert_eq!((run.serial(), run.signed()), (first.clone(), 1));
        run.settle(Duration::from_secs(2 * 60)).await;
        let second = run.serial();
        assert!(second.is_some() && second != first, "renewed on time");

        // The agent's clock alone ten minutes behind (the CA's leaves then
        // start eight minutes in the agent's future): answers are refused,
        // the current certificate kept, requests retried.
        run.clocks.agent.fetch_sub(600, Ordering::SeqCst);
        let signed = run.signed();
        run.settle(Duration::from_secs(31 * 60)).await;
        assert!(run.signed() > signed + 2, "retried");
        assert_eq!(run.serial(), second, "the current certificate is kept");
        assert!(run.metrics.csr_failures.with_label_values(&["web"]).get() >= 3);
        // The clock is set right: the next retry renews.
        run.clocks.agent.fetch_add(600, Ordering::SeqCst);
        run.settle(Duration::from_secs(60)).await;
        assert!(run.serial().is_some() && run.serial() != second);
        run.assert_all_published_valid();
    }
}
