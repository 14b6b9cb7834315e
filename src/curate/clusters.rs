//! Near-duplicate clusters over every distinct normalized input of a curate, with the
//! signatures on disk rather than in memory: `dedup::NearDup::clusters`' result for
//! inputs that come part by part.
//!
//! Each input (`gid`: its index among all parts' inputs) leaves its short signature in
//! one file (64 bytes, read back through a memory map) and one record a band in a bucket
//! file chosen by the band's key. A bucket file then holds every input that shares a key
//! with any other, so the buckets are clustered one at a time: inputs with equal keys (the
//! band is part of the key) are compared with the earliest of them (by first row, the order
//! `NearDup` sees them in), and a similar pair joins their clusters in a union-find whose
//! root is each cluster's earliest input. Memory: 4 bytes an input for the union-find, 4
//! for the first rows, one bucket file's records (16 bytes each in memory) and groups at a
//! time, and the mapped signatures' pages (64 bytes an input, clean pages of their file);
//! the groups of a bucket are compared across the cores.
//!
//! On disk an input costs 64 + 16 × 10 bytes (224; 5.6 GB at 25M inputs, 100M rows), half
//! of what 16-bit signatures and 13-byte records took: less for the page cache to hold
//! beside curate's other files (bench-results/curate-scale.md, 2026-12-06).

use crate::dedup::NearDup;
use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes of one bucket record: the band key's high 48 bits (its low bits chose the
/// bucket; two different keys of a bucket agree in 48 bits with odds 2⁻⁴⁸), gid (4).
const RECORD: usize = 10;

/// Inputs whose signatures are computed together (1 KB each).
const BLOCK: usize = 4096;

pub struct ClusterIndex {
    near: NearDup,
    signatures_path: PathBuf,
    signatures: BufWriter<File>,
    bucket_paths: Vec<PathBuf>,
    buckets: Vec<BufWriter<File>>,
    first_row: Vec<u32>,
}

impl ClusterIndex {
    /// An index writing its files in `dir`, spread over `buckets` bucket files (each holds
    /// about 1 / buckets of the 16 records an input leaves).
    pub fn new(near: NearDup, dir: &Path, buckets: usize) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let create = |path: &Path| -> Result<BufWriter<File>> {
            let file =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            Ok(BufWriter::with_capacity(1 << 16, file))
        };
        let signatures_path = dir.join("signatures.bin");
        let bucket_paths: Vec<PathBuf> = (0..buckets.max(1))
            .map(|b| dir.join(format!("bucket-{b:05}.bin")))
            .collect();
        Ok(ClusterIndex {
            signatures: create(&signatures_path)?,
            buckets: bucket_paths
                .iter()
                .map(|p| create(p))
                .collect::<Result<_>>()?,
            signatures_path,
            bucket_paths,
            near,
            first_row: vec![],
        })
    }

    /// Add the next inputs (each one's gid is the number added before it), with their
    /// first rows. Signatures are computed across the cores, a block of inputs at a time.
    pub fn add_all<'a>(&mut self, inputs: impl IntoIterator<Item = (&'a str, u32)>) -> Result<()> {
        use rayon::prelude::*;
        let mut block: Vec<(&str, u32)> = Vec::with_capacity(BLOCK);
        let mut inputs = inputs.into_iter().peekable();
        while inputs.peek().is_some() {
            block.clear();
            block.extend(inputs.by_ref().take(BLOCK));
            let signatures: Vec<Vec<u64>> = block
                .par_iter()
                .map(|(text, _)| self.near.signature(text))
                .collect();
            for ((_, first_row), signature) in block.iter().zip(&signatures) {
                self.write(signature, *first_row)?;
            }
        }
        Ok(())
    }

    fn write(&mut self, signature: &[u64], first_row: u32) -> Result<()> {
        let gid = self.first_row.len() as u32;
        self.first_row.push(first_row);
        self.signatures.write_all(&NearDup::short(signature))?;
        let n = self.buckets.len() as u64;
        for band in 0..self.near.bands {
            let key = self.near.band_key(signature, band);
            let mut record = [0u8; RECORD];
            record[..6].copy_from_slice(&key.to_le_bytes()[2..]);
            record[6..].copy_from_slice(&gid.to_le_bytes());
            self.buckets[(key % n) as usize].write_all(&record)?;
        }
        Ok(())
    }

    /// Each input's cluster: the gid of the cluster's earliest input.
    pub fn roots(self) -> Result<Vec<u32>> {
        let ClusterIndex {
            near,
            signatures_path,
            mut signatures,
            bucket_paths,
            buckets,
            first_row,
        } = self;
        signatures.flush()?;
        drop(signatures);
        for mut b in buckets {
            b.flush()?;
        }
        let stored = Signatures::open(&signatures_path, near.short_bytes())?;
        let mut parent: Vec<u32> = (0..first_row.len() as u32).collect();
        let started = std::time::Instant::now();
        let mut compared = 0u64;
        for (b, path) in bucket_paths.iter().enumerate() {
            use rayon::prelude::*;
            let mut records = read_records(path)?;
            std::fs::remove_file(path)?;
            // Equal keys together, then the earliest input of each group of two or more
            // first. (Sorting by the key alone, across the cores, and looking up first rows
            // only for the few records that share a key: the sort by (key, first row) was
            // a quarter of this pass at 10M rows, on one core, with a random read of
            // `first_row` in every comparison.)
            records.par_sort_unstable_by_key(|&(key, _)| key);
            let groups: Vec<&[Record]> = records
                .chunk_by_mut(|a, b| a.0 == b.0)
                .filter(|group| group.len() > 1)
                .map(|group| {
                    let earliest = (0..group.len())
                        .min_by_key(|&i| first_row[group[i].1 as usize])
                        .unwrap_or(0);
                    group.swap(0, earliest);
                    &*group
                })
                .collect();
            // The groups are compared across the cores against the clusters as they stood
            // before this bucket, and the similar pairs joined after: the clusters are the
            // connected components of the similar pairs, in whatever order they are joined
            // (a root that changed within the bucket only costs a comparison).
            let (similar, n) = groups
                .par_iter()
                .try_fold(
                    || (vec![], 0u64),
                    |(mut similar, n), group| -> Result<_> {
                        let m = compare_group(group, &parent, &near, &stored, &mut similar)?;
                        Ok((similar, n + m))
                    },
                )
                .try_reduce(
                    || (vec![], 0),
                    |(mut a, n), (b, m)| {
                        a.extend(b);
                        Ok((a, n + m))
                    },
                )?;
            compared += n;
            for (a, lead) in similar {
                union(&mut parent, &first_row, a, lead);
            }
            if bucket_paths.len() > 1 {
                let (done, secs) = (b + 1, started.elapsed().as_secs_f64());
                eprintln!(
                    "curate: near-duplicate clusters, bucket {done}/{}, {compared} pairs compared, eta {:.0} s",
                    bucket_paths.len(),
                    secs / done as f64 * (bucket_paths.len() - done) as f64
                );
            }
        }
        drop(stored);
        std::fs::remove_file(&signatures_path)?;
        // Each entry becomes its root in place (no second array of the inputs' size).
        for i in 0..parent.len() as u32 {
            let r = root(&mut parent, i);
            parent[i as usize] = r;
        }
        Ok(parent)
    }
}

/// One record of a bucket file: the band key's high 48 bits, gid.
type Record = (u64, u32);

/// Compare each input of a group (one band key) with its lead, the group's first, unless
/// already in the lead's cluster; push the similar ones with the lead to `similar`.
/// Returns the pairs compared.
fn compare_group(
    group: &[Record],
    parent: &[u32],
    near: &NearDup,
    stored: &Signatures,
    similar: &mut Vec<(u32, u32)>,
) -> Result<u64> {
    let lead = group[0].1;
    let lead_root = find(parent, lead);
    let lead_signature = stored.get(lead)?;
    let mut compared = 0;
    for &(_, gid) in &group[1..] {
        // Already one cluster: comparing could not change it. A near-duplicate pair meets
        // in most bands, so this skips most comparisons.
        if find(parent, gid) == lead_root {
            continue;
        }
        compared += 1;
        if near.similar(stored.get(gid)?, lead_signature) {
            similar.push((gid, lead));
        }
    }
    Ok(compared)
}

/// The root of i's cluster, without shortening paths (for threads that share `parent`).
fn find(parent: &[u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        i = parent[i as usize];
    }
    i
}

fn root(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        parent[i as usize] = parent[parent[i as usize] as usize];
        i = parent[i as usize];
    }
    i
}

/// Join the clusters of a and b under the earlier of their roots.
fn union(parent: &mut [u32], first_row: &[u32], a: u32, b: u32) {
    let (ra, rb) = (root(parent, a), root(parent, b));
    if ra == rb {
        return;
    }
    let key = |r: u32| (first_row[r as usize], r);
    let (lo, hi) = if key(ra) < key(rb) {
        (ra, rb)
    } else {
        (rb, ra)
    };
    parent[hi as usize] = lo;
}

fn read_records(path: &Path) -> Result<Vec<Record>> {
    let mut bytes = vec![];
    File::open(path)
        .and_then(|f| BufReader::new(f).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes
        .chunks_exact(RECORD)
        .map(|r| {
            let mut key = [0u8; 8];
            key[..6].copy_from_slice(&r[..6]);
            let mut gid = [0u8; 4];
            gid.copy_from_slice(&r[6..]);
            (u64::from_le_bytes(key), u32::from_le_bytes(gid))
        })
        .collect())
}

/// The short signatures file, read by gid from a read-only memory map, from any thread.
///
/// The map's pages count in curate's resident memory, up to the whole file (64 bytes an
/// input: 1.6 GB at 25M inputs, 100M rows), but they are clean pages of a file the kernel
/// can drop and read again. One positioned read a signature instead cost a system call a
/// candidate pair, the largest part of this pass (a third of its samples at 10M rows,
/// bench-results/curate-scale.md, 2026-12-06c). When the signatures were 12 GB (32-bit
/// values) the merge after a map ran 2.8× slower, likely its files pushed out of the page
/// cache by the mapped pages; whether it pays at 1.6 GB those runs do not settle.
struct Signatures {
    /// None for an empty file (no input: a map cannot be empty).
    map: Option<memmap2::Mmap>,
    path: PathBuf,
    /// Bytes a signature.
    len: usize,
}

impl Signatures {
    fn open(path: &Path, len: usize) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bytes = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let map = if bytes == 0 {
            None
        } else {
            // Safety: the file is curate's own, in its work folder, written and flushed
            // above and neither written nor truncated while mapped (removed after).
            let map = unsafe { memmap2::MmapOptions::new().map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            // Pairs land anywhere in the file: no read-ahead past the page a pair needs.
            map.advise(memmap2::Advice::Random)
                .with_context(|| format!("cannot advise on {}", path.display()))?;
            Some(map)
        };
        Ok(Signatures {
            map,
            path: path.to_path_buf(),
            len,
        })
    }

    /// Signature `gid`.
    fn get(&self, gid: u32) -> Result<&[u8]> {
        let start = gid as usize * self.len;
        self.map
            .as_ref()
            .and_then(|map| map.get(start..start + self.len))
            .with_context(|| {
                format!(
                    "input {gid}'s near-duplicate signature is past the end of {}",
                    self.path.display()
                )
            })
    }
}

/// Whether each input leads the near-duplicate rule's choice in its cluster: among the
/// cluster's inputs with a row the head rules kept, the one whose kept row comes first.
pub fn leaders(roots: &[u32], kept_row: &[u32]) -> Vec<bool> {
    // Per root: the input of its cluster with the earliest kept row (u32::MAX: none yet).
    let mut best: Vec<u32> = vec![u32::MAX; roots.len()];
    for (gid, (&r, &row)) in roots.iter().zip(kept_row).enumerate() {
        let b = best[r as usize];
        if row != u32::MAX && (b == u32::MAX || row < kept_row[b as usize]) {
            best[r as usize] = gid as u32;
        }
    }
    roots
        .iter()
        .enumerate()
        .map(|(gid, &r)| best[r as usize] == gid as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_from_disk_equal_the_in_memory_clusters() {
        // 300 texts: 100 bases, each followed later by one or two variants with a word
        // changed, in a shuffled order, so clusters span buckets and first rows.
        let mut texts: Vec<String> = vec![];
        for i in 0..100u64 {
            let words: Vec<String> = (0..20)
                .map(|j| format!("w{}", (i * 37 + j * 11) * 7919 % 100_003))
                .collect();
            texts.push(words.join(" "));
            texts.push(format!("{} changed", words[..19].join(" ")));
            if i % 3 == 0 {
                texts.push(format!("x {}", words[1..].join(" ")));
            }
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40);
        let texts: Vec<&str> = order.iter().map(|&i| texts[i].as_str()).collect();
        let expected = NearDup::new(0.7, 3).clusters(&texts);
        assert!(
            expected
                .iter()
                .enumerate()
                .filter(|(i, c)| *i != **c)
                .count()
                > 50,
            "the test has near-duplicates"
        );

        // The same texts added in another order (as parts would), each with its row.
        let dir = tempfile::tempdir().unwrap();
        let mut index = ClusterIndex::new(NearDup::new(0.7, 3), dir.path(), 7).unwrap();
        let added: Vec<usize> = (0..texts.len()).rev().collect();
        index
            .add_all(added.iter().map(|&i| (texts[i], i as u32 * 2)))
            .unwrap();
        let roots = index.roots().unwrap();
        for (gid, &i) in added.iter().enumerate() {
            let root_text = added[roots[gid] as usize];
            assert_eq!(root_text, expected[i], "text {i}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_index_of_no_inputs_has_no_roots_and_leaves_no_file() {
        // The signatures file is empty, and an empty file cannot be mapped.
        let dir = tempfile::tempdir().unwrap();
        let index = ClusterIndex::new(NearDup::new(0.8, 3), dir.path(), 3).unwrap();
        assert_eq!(index.roots().unwrap(), Vec::<u32>::new());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_signature_past_the_end_of_the_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signatures.bin");
        std::fs::write(&path, [7u8; 128]).unwrap();
        let stored = Signatures::open(&path, 64).unwrap();
        assert_eq!(stored.get(1).unwrap(), &[7u8; 64][..]);
        let err = format!("{:#}", stored.get(2).unwrap_err());
        assert!(
            err.contains("input 2") && err.contains("signatures.bin"),
            "{err}"
        );
    }

    #[test]
    fn the_leader_is_the_cluster_input_kept_first() {
        // Inputs 0, 1, 2 one cluster (root 0); 0 kept nothing, 2 kept row 5, 1 row 9.
        let roots = [0, 0, 0, 3];
        let kept = [u32::MAX, 9, 5, 7];
        assert_eq!(leaders(&roots, &kept), [false, false, true, true]);
    }
}
