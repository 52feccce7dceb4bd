//! File-system faults for the state-directory tests, as root: a small
//! tmpfs that a filler file makes full, and a directory made read-only by
//! a read-only bind mount of itself. Every mount is undone (`umount -l`)
//! when its guard drops, on every path out of a test, a panicking one
//! included. Mounting that fails panics: these tests never skip.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The page size tmpfs counts its space in.
pub const PAGE: u64 = 4096;

fn run(args: &[&str], path: &Path) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} {}: {}{} (these tests run as root and need mount(8); they do not skip)",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount, undone on drop.
pub struct Mount {
    path: PathBuf,
}

impl Mount {
    /// A fresh tmpfs of `bytes` at `path` (made if absent), mode 0700.
    pub fn tmpfs(path: &Path, bytes: u64) -> Self {
        fs::create_dir_all(path).unwrap();
        let opts = format!("size={bytes},mode=0700");
        run(&["mount", "-t", "tmpfs", "-o", &opts, "tmpfs"], path);
        Self {
            path: path.to_owned(),
        }
    }

    /// `path` made read-only where it is (the file system under it stays
    /// writable for whoever holds it open already: as a disk remounted
    /// read-only under a running process looks to its new opens).
    pub fn read_only(path: &Path) -> Self {
        let p = path.to_str().unwrap();
        run(&["mount", "--bind", p], path);
        // From here the guard undoes the bind, even if the remount fails.
        let guard = Self {
            path: path.to_owned(),
        };
        run(&["mount", "-o", "remount,ro,bind"], path);
        assert!(
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path.join(".probe"))
                .is_err(),
            "{} is still writable",
            path.display()
        );
        guard
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok && !std::thread::panicking() {
            panic!("umount -l {} failed", self.path.display());
        }
    }
}

/// Free blocks (pages) of the file system holding `path`.
pub fn free_pages(path: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    let (free, size) = (it.next().unwrap(), it.next().unwrap());
    free * size / PAGE
}

/// A file filling the tmpfs at `dir` up to `leave` free pages; removed
/// (the space given back) on drop.
pub struct Filler {
    path: PathBuf,
}

impl Filler {
    pub fn new(dir: &Path, leave: u64) -> Self {
        let path = dir.join("filler");
        let mut f = File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", dir.display()),
            }
        }
        let len = f.metadata().unwrap().len() / PAGE * PAGE;
        f.set_len(len.saturating_sub(leave * PAGE)).unwrap();
        // A running server may free a page meanwhile (its ledger replaced
        // by a rename): taken up again, a few times at most.
        for _ in 0..10 {
            let free = free_pages(dir);
            if free <= leave {
                break;
            }
            let len = f.metadata().unwrap().len();
            f.seek(SeekFrom::Start(len)).unwrap();
            let _ = f.write_all(&vec![0u8; ((free - leave) * PAGE) as usize]);
        }
        drop(f);
        assert_eq!(free_pages(dir), leave, "{} filled", dir.display());
        Self { path }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
