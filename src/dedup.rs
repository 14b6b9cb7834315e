//! Text matching for dedup and decontamination (curate and synthesize), on normalized
//! inputs (lower case, words of letters and digits): near-duplicate clusters by MinHash
//! over word shingles with locality-sensitive hashing, and n-gram overlap with evaluation
//! texts.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};

/// Lower-case words of letters and digits: punctuation and spacing do not make two inputs
/// different.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The exact-duplicate key of an input.
pub fn normalize(text: &str) -> String {
    words(text).join(" ")
}

pub fn hash64<T: Hash + ?Sized>(value: &T) -> u64 {
    // std's SipHash with fixed keys: stable within a build, which is all a run needs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The n-word windows of a text (the whole text when it has n words or fewer): what
/// near-duplicate shingles and decontamination n-grams are made of.
fn grams(words: &[String], n: usize) -> impl Iterator<Item = &[String]> {
    let whole = (words.len() <= n).then_some(words);
    let windows = (words.len() > n).then(|| words.windows(n));
    whole.into_iter().chain(windows.into_iter().flatten())
}

/// Hashes of the n-word windows of a text (the whole text when shorter than n).
fn shingles(words: &[String], n: usize) -> Vec<u64> {
    grams(words, n).map(hash64).collect()
}

/// The set of n-word shingle hashes of a text (exact Jaccard on small collections).
pub fn shingle_set(text: &str, n: usize) -> HashSet<u64> {
    shingles(&words(text), n).into_iter().collect()
}

/// MinHash signatures and LSH banding: `bands × rows` hash functions; two texts become
/// candidates when one band of their signatures is equal, and a pair joins a cluster when
/// its estimated Jaccard similarity reaches `threshold`.
pub struct NearDup {
    pub shingle_words: usize,
    pub bands: usize,
    pub rows: usize,
    pub threshold: f64,
}

impl NearDup {
    pub fn new(threshold: f64, shingle_words: usize) -> Self {
        // 16 bands of 8 rows: pairs at Jaccard 0.8 meet in a band with probability
        // 1 − (1 − 0.8⁸)¹⁶ ≈ 0.96; pairs at 0.5 with ≈ 0.06 (verified afterwards anyway).
        NearDup {
            shingle_words,
            bands: 16,
            rows: 8,
            threshold,
        }
    }

    /// The MinHash signature of a text: `bands × rows` minimums.
    pub fn signature(&self, text: &str) -> Vec<u64> {
        let sh = shingles(&words(text), self.shingle_words);
        let n = self.bands * self.rows;
        // Hash function i: a multiply-xorshift of the shingle hash with seed i.
        (0..n as u64)
            .map(|i| {
                let (a, b) = (
                    0x9E37_79B9_7F4A_7C15u64.wrapping_mul(2 * i + 1),
                    i.wrapping_mul(0xD6E8_FEB8_6659_FD93),
                );
                sh.iter()
                    .map(|&x| {
                        let y = (x ^ b).wrapping_mul(a);
                        y ^ (y >> 29)
                    })
                    .min()
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }

    /// The LSH key of one band of a signature: texts with equal keys in a band are
    /// candidates. The band is part of the key, so keys of different bands differ too.
    pub fn band_key(&self, signature: &[u64], band: usize) -> u64 {
        hash64(&(band, &signature[band * self.rows..(band + 1) * self.rows]))
    }

    /// What the verification of a candidate pair compares: the low 4 bits of each
    /// minimum, two to a byte (b-bit minwise hashing, Li & König 2010). Two equal
    /// minimums agree there always, two different ones by chance with odds 1/16, which
    /// `similar` takes back out of the estimate. At b = 4 and 128 values the estimate's
    /// standard error at Jaccard 0.8 is 0.037, against 0.035 with whole 64-bit minimums, in
    /// 64 bytes an input: the signatures curate stores for verification take 1.6 GB at
    /// 25M inputs instead of 6.4 with 16-bit values, and its near-duplicate pass went
    /// from 155 to 120 s at 100M rows (bench-results/curate-scale.md, 2026-12-06).
    pub fn short(signature: &[u64]) -> Vec<u8> {
        signature
            .chunks(2)
            .map(|pair| {
                let low = (pair[0] & 0x0F) as u8;
                let high = pair.get(1).map_or(0, |&v| (v & 0x0F) as u8);
                low | high << 4
            })
            .collect()
    }

    /// Bytes of a short signature: `bands × rows` values, two to a byte.
    pub fn short_bytes(&self) -> usize {
        (self.bands * self.rows).div_ceil(2)
    }

    /// Whether two short signatures (of `bands × rows` values) estimate a Jaccard
    /// similarity of at least the threshold. A share `m` of equal 4-bit values estimates
    /// J = (m − 1/16) / (1 − 1/16): the different minimums that agree by chance taken out.
    pub fn similar(&self, a: &[u8], b: &[u8]) -> bool {
        let values = self.bands * self.rows;
        let same: usize = a
            .iter()
            .zip(b)
            .map(|(x, y)| {
                let d = x ^ y;
                usize::from(d & 0x0F == 0) + usize::from(d & 0xF0 == 0)
            })
            .sum();
        // A padding nibble (odd `values`) is 0 in both and always agrees.
        let same = same - (self.short_bytes() * 2 - values);
        let chance = 1.0 / 16.0;
        let matched = same as f64 / values as f64;
        (matched - chance) / (1.0 - chance) >= self.threshold
    }

    /// For each text, the index of its cluster's first member (itself when it has no
    /// near-duplicate before it). In each band a text is compared with the first text
    /// that had its key; a similar pair joins their clusters. (`curate::clusters` does
    /// the same over texts on disk.)
    pub fn clusters(&self, texts: &[&str]) -> Vec<usize> {
        use rayon::prelude::*;
        let sigs: Vec<Vec<u64>> = texts.par_iter().map(|t| self.signature(t)).collect();
        let shorts: Vec<Vec<u8>> = sigs.iter().map(|s| Self::short(s)).collect();
        let mut parent: Vec<usize> = (0..texts.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for band in 0..self.bands {
            let mut buckets: HashMap<u64, usize> = HashMap::new();
            for (i, sig) in sigs.iter().enumerate() {
                let key = self.band_key(sig, band);
                match buckets.get(&key) {
                    None => {
                        buckets.insert(key, i);
                    }
                    Some(&j) => {
                        if self.similar(&shorts[i], &shorts[j]) {
                            let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                            // The earlier text leads the cluster.
                            let (lo, hi) = (ri.min(rj), ri.max(rj));
                            parent[hi] = lo;
                        }
                    }
                }
            }
        }
        (0..texts.len()).map(|i| root(&mut parent, i)).collect()
    }
}

/// The n-grams of evaluation texts; a training input sharing any of them is contaminated.
/// Texts shorter than n words are matched whole.
pub struct Contamination {
    n: usize,
    hashes: HashSet<u64, GramHash>,
}

/// How decontamination hashes an n-gram, and its set the hashes: foldhash with a fixed
/// seed, where `hash64`'s SipHash was the largest symbol of curate's head rules in a
/// profile (every window of every input is hashed). The hashes are only compared within
/// one run, against the evaluation texts' hashed the same way, so any well-mixed 64-bit
/// hash decides the same (a false match needs a 64-bit collision); `hash64` stays where
/// its values decide outcomes (MinHash shingles, splits, parts).
type GramHash = foldhash::fast::FixedState;

fn gram_hash(words: &[String]) -> u64 {
    GramHash::default().hash_one(words)
}

impl Contamination {
    pub fn new<'a>(eval_texts: impl Iterator<Item = &'a str>, n: usize) -> Self {
        let mut hashes = HashSet::with_hasher(GramHash::default());
        for t in eval_texts {
            hashes.extend(grams(&words(t), n).map(gram_hash));
        }
        Contamination { n, hashes }
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn contaminated(&self, text: &str) -> bool {
        grams(&words(text), self.n).any(|g| self.hashes.contains(&gram_hash(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalize("Hi,   THERE!"), normalize("hi there"));
        assert_ne!(normalize("hi there"), normalize("hi where"));
    }

    #[test]
    fn near_duplicates_cluster_and_others_do_not() {
        let base = "Paco had 26 salty cookies and 17 sweet cookies. He ate 14 sweet cookies and 9 salty cookies. How many salty cookies did Paco have left?";
        let near = "Paco had 26 salty cookies and 17 sweet cookies. He ate 14 sweet cookies and 9 salty cookies. How many salty cookies does Paco have left?";
        let other =
            "A baker made 48 muffins and sold 30 of them. He packed the rest equally into 3 boxes.";
        let nd = NearDup::new(0.7, 3);
        // Hand-checked: one word of 27 changed alters 3 of 25 shingles: Jaccard 22/28 ≈ 0.79.
        assert_eq!(nd.clusters(&[base, other, near]), vec![0, 1, 0]);
        assert_eq!(NearDup::new(0.95, 3).clusters(&[base, near]), vec![0, 1]);
    }

    #[test]
    fn the_short_estimate_takes_chance_agreements_out() {
        let nd = NearDup::new(0.8, 3);
        let a: Vec<u64> = (0..128u64).map(|i| i * 0x1_0000 + (i % 16)).collect();
        // 96 equal minimums; of the 32 different ones, 8 agree in the low 4 bits by
        // chance: 104 of 128 short values agree, (104/128 − 1/16) / (15/16) = 0.8.
        let b: Vec<u64> = a
            .iter()
            .enumerate()
            .map(|(i, &v)| match i {
                0..96 => v,
                96..104 => v + 0x100,
                _ => v ^ 0x5,
            })
            .collect();
        let (sa, sb) = (NearDup::short(&a), NearDup::short(&b));
        assert_eq!(sa.len(), 64);
        assert!(NearDup::new(0.79, 3).similar(&sa, &sb));
        assert!(!NearDup::new(0.81, 3).similar(&sa, &sb));
        assert!(nd.similar(&sa, &sa));
        // Unrelated texts agree in about 1 value of 16: an estimate near 0, not 1/16.
        let (x, y) = (
            nd.signature("the quick brown fox jumps over the lazy dog near the river bank"),
            nd.signature("a completely different sentence about baking bread in a hot oven"),
        );
        assert!(!NearDup::new(0.2, 3).similar(&NearDup::short(&x), &NearDup::short(&y)));
    }

    #[test]
    fn thirteen_gram_overlap_is_contamination() {
        let eval = ["Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack How much do you have to pay to buy each pack?"];
        let c = Contamination::new(eval.iter().copied(), 13);
        // Shares a 13-word window (reworded start, same middle).
        assert!(c.contaminated("Look: if there is a discount of 25 dollars on each pack how much do you have to pay, friend?"));
        assert!(!c.contaminated("Each pack of pens costs 7 dollars. How much do 3 packs cost?"));
        let short = Contamination::new(["How are you"].into_iter(), 13);
        assert!(short.contaminated("how are YOU?"));
        assert!(!short.contaminated("how are we"));
        // An evaluation text of exactly n words is its one window: found whole or inside.
        let exact = Contamination::new(["red blue green"].into_iter(), 3);
        assert!(exact.contaminated("Red, blue, green!"));
        assert!(exact.contaminated("pick red blue green now"));
        assert!(!exact.contaminated("red green blue"));
    }
}
