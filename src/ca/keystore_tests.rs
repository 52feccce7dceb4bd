use super::*;
use std::os::unix::fs::PermissionsExt;

fn spec() -> RootSpec {
    RootSpec {
        trust_domain: TrustDomain::new("td").unwrap(),
        algorithm: KeyAlgorithm::EcdsaP256,
        lifetime: Duration::from_secs(3600),
    }
}

fn authority() -> Authority {
    crate::ca::testing::authority("td", 3600)
}

#[tokio::test]
async fn creates_once_then_reuses_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("state/ca"));
    let now = SystemTime::now();
    let (first, created) = load_or_create(&store, &spec(), None, now).await.unwrap();
    assert!(created);
    let (second, created) = load_or_create(&store, &spec(), None, now).await.unwrap();
    assert!(!created);
    assert_eq!(first.active().signer(), second.active().signer());
    let key = store.member_dir(first.active().id()).join("ca-key.pem");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(store.dir()), 0o700);
    assert_eq!(mode(&store.dir().join(MANIFEST)), 0o600);
}

#[tokio::test]
async fn a_swap_from_a_stale_generation_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ca"));
    let now = SystemTime::now();
    let (set, _) = load_or_create(&store, &spec(), None, now).await.unwrap();
    let prepared = set.prepare(authority(), now).unwrap();
    assert!(store.swap(Some(1), &prepared.to_stored()).await.unwrap());
    // A second writer that read generation 1 loses.
    let other = set.prepare(authority(), now).unwrap();
    assert!(!store.swap(Some(1), &other.to_stored()).await.unwrap());
    assert!(!store.swap(None, &other.to_stored()).await.unwrap());
    let stored = store.load().await.unwrap().unwrap();
    assert_eq!(stored.generation, 2);
    assert_eq!(store.generation().await.unwrap(), Some(2));
    let ids: Vec<&str> = stored.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [set.active().id(), prepared.members()[1].authority.id()]
    );
    assert!(
        !store.member_dir(other.members()[1].authority.id()).exists(),
        "the loser wrote no key"
    );
}

#[tokio::test]
async fn keys_leave_the_disk_only_with_their_authority() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ca"));
    let now = SystemTime::now();
    let (set, _) = load_or_create(&store, &spec(), None, now).await.unwrap();
    let old = set.active().id().to_owned();
    let mut current = set;
    for step in 0..3 {
        let next = match step {
            0 => current.prepare(authority(), now).unwrap(),
            1 => current.activate(now).unwrap(),
            _ => current.retire().unwrap(),
        };
        assert!(
            store
                .swap(Some(current.generation()), &next.to_stored())
                .await
                .unwrap()
        );
        current = next;
        assert_eq!(
            store.member_dir(&old).exists(),
            step < 2,
            "after step {step}"
        );
    }
    let reloaded = AuthoritySet::from_stored(
        &store.load().await.unwrap().unwrap(),
        &spec().trust_domain,
        now,
    )
    .unwrap();
    assert_eq!(reloaded.generation(), 4);
    assert_eq!(reloaded.active().id(), current.active().id());
}

#[tokio::test]
async fn the_layout_before_rotation_reads_as_one_authority_and_moves_on_the_first_swap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let a = authority();
    CacertsDir::new(&dir).create(a.files()).unwrap();
    let store = DirStore::new(&dir);
    let stored = store.load().await.unwrap().unwrap();
    assert_eq!(
        (stored.generation, stored.members[0].id.as_str()),
        (1, a.id())
    );
    let set = AuthoritySet::from_stored(&stored, &spec().trust_domain, SystemTime::now()).unwrap();
    let next = set.prepare(authority(), SystemTime::now()).unwrap();
    assert!(store.swap(Some(1), &next.to_stored()).await.unwrap());
    assert!(
        !dir.join("ca-key.pem").exists(),
        "the old layout's files are gone"
    );
    assert!(store.member_dir(a.id()).join("ca-key.pem").exists());
    assert_eq!(store.load().await.unwrap().unwrap().generation, 2);
}

/// An authority that signs nothing may expire in the set without
/// stopping the CA: it loads (and can be retired); it cannot activate.
#[tokio::test]
async fn an_expired_authority_that_signs_nothing_still_loads_but_never_activates() {
    let td = spec().trust_domain;
    let now = SystemTime::now();
    let short = |secs| {
        let f =
            Authority::generate_root(&td, KeyAlgorithm::EcdsaP256, Duration::from_secs(secs), now)
                .unwrap();
        Authority::from_files(&f, &td, now).unwrap()
    };
    let retiring = AuthoritySet::single_since(short(60), now)
        .unwrap()
        .prepare(short(86_400), now)
        .unwrap()
        .activate(now)
        .unwrap();
    let later = now + Duration::from_secs(3600);
    let loaded = AuthoritySet::from_stored(&retiring.to_stored(), &td, later).unwrap();
    assert_eq!(loaded.members().len(), 2);
    assert!(loaded.retire().is_ok());

    let prepared = AuthoritySet::single_since(short(86_400), now)
        .unwrap()
        .prepare(short(60), now)
        .unwrap();
    let loaded = AuthoritySet::from_stored(&prepared.to_stored(), &td, later).unwrap();
    let err = loaded.activate(later).unwrap_err().to_string();
    assert!(err.contains("not valid now"), "{err}");
    // Another prepare replaces it.
    let replaced = loaded.prepare(short(86_400), later).unwrap();
    assert_eq!(replaced.members().len(), 2);
    assert!(replaced.activate(later).is_ok());
    // The active one must be valid.
    assert!(
        AuthoritySet::from_stored(
            &prepared.to_stored(),
            &td,
            now + Duration::from_secs(2 * 86_400)
        )
        .is_err()
    );
}

#[tokio::test]
async fn a_manifest_naming_a_missing_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ca"));
    let (set, _) = load_or_create(&store, &spec(), None, SystemTime::now())
        .await
        .unwrap();
    fs::remove_dir_all(store.member_dir(set.active().id())).unwrap();
    let err = store.load().await.unwrap_err().to_string();
    assert!(err.contains("directory is missing"), "{err}");
}

/// The manifest lost beside authorities' directories: refused, never read
/// as empty (which would make a new root), whether or not a server ran
/// (`cp dir/*` skips the dot files). Only an interrupted creation (its
/// `.creating` marker still there) is swept and the CA created.
#[tokio::test]
async fn directories_without_their_manifest_are_refused_unless_the_creation_was_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ca"));
    let now = SystemTime::now();
    let (set, _) = load_or_create(&store, &spec(), None, now).await.unwrap();
    assert!(
        !store.dir().join(".creating").exists(),
        "the marker outlived the creation"
    );
    fs::remove_file(store.dir().join(MANIFEST)).unwrap();
    // The creation interrupted before its manifest: swept, the CA created.
    fs::write(store.dir().join(".creating"), "").unwrap();
    let (again, created) = load_or_create(&store, &spec(), None, now).await.unwrap();
    assert!(created);
    assert!(!store.member_dir(set.active().id()).exists());
    assert!(!store.dir().join(".creating").exists());

    for server_ran in [false, true] {
        if server_ran {
            drop(store.server_lock().unwrap());
        }
        let manifest = fs::read(store.dir().join(MANIFEST)).unwrap();
        fs::remove_file(store.dir().join(MANIFEST)).unwrap();
        let err = load_or_create(&store, &spec(), None, now)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("authorities.json is missing") && err.contains(again.active().id()),
            "{err}"
        );
        assert!(store.generation().await.is_err());
        let next = again.prepare(authority(), now).unwrap();
        assert!(store.swap(Some(1), &next.to_stored()).await.is_err());
        assert!(store.member_dir(again.active().id()).exists());
        fs::write(store.dir().join(MANIFEST), manifest).unwrap();
    }
}

/// At start, a manifest that does not name an authority's directory (an
/// older copy restored from a backup) never gets that directory deleted:
/// it is moved aside, and the key stays on disk.
#[tokio::test]
async fn tidying_at_start_moves_unnamed_authorities_aside_never_deletes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ca"));
    let now = SystemTime::now();
    let (set, _) = load_or_create(&store, &spec(), None, now).await.unwrap();
    let old_manifest = fs::read(store.dir().join(MANIFEST)).unwrap();
    let next = set.prepare(authority(), now).unwrap();
    assert!(store.swap(Some(1), &next.to_stored()).await.unwrap());
    let new_id = next.members().last().unwrap().authority.id().to_owned();
    assert!(store.member_dir(&new_id).exists());
    // The old manifest restored: it names the first authority only.
    fs::write(store.dir().join(MANIFEST), old_manifest).unwrap();
    store.tidy().unwrap();
    assert!(!store.member_dir(&new_id).exists());
    let aside = store.dir().join(format!(".unnamed-{new_id}"));
    assert!(
        aside.join("ca-key.pem").exists(),
        "the unnamed authority's key was deleted"
    );
}

/// A kept authority's file changed on disk since it was loaded: the swap
/// is refused naming the file, and writes nothing.
#[tokio::test]
async fn a_swap_refuses_a_kept_authority_corrupted_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ca"));
    let now = SystemTime::now();
    let (set, _) = load_or_create(&store, &spec(), None, now).await.unwrap();
    let key = store.member_dir(set.active().id()).join("ca-key.pem");
    let good = fs::read(&key).unwrap();
    fs::write(&key, &good[..good.len() / 2]).unwrap();
    let next = set.prepare(authority(), now).unwrap();
    let err = store
        .swap(Some(1), &next.to_stored())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(!store.member_dir(next.members()[1].authority.id()).exists());
    fs::write(&key, &good).unwrap();
    assert!(store.swap(Some(1), &next.to_stored()).await.unwrap());
}
