//! Text matching for dedup and decontamination (curate and synthesize), on normalized
//! inputs (lower case, words of letters and digits): near-duplicate clusters by MinHash
//! over word shingles with locality-sensitive hashing, and n-gram overlap with evaluation
//! texts.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

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

/// Hashes of the n-word windows of a text (the whole text when shorter than n).
fn shingles(words: &[String], n: usize) -> Vec<u64> {
    if words.len() <= n {
        return vec![hash64(words)];
    }
    words.windows(n).map(hash64).collect()
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
    /// candidates.
    pub fn band_key(&self, signature: &[u64], band: usize) -> u64 {
        hash64(&signature[band * self.rows..(band + 1) * self.rows])
    }

    /// What the verification of a candidate pair compares: the low 16 bits of each
    /// minimum. Two different minimums agree there with odds 2⁻¹⁶, so a pair's 128-value
    /// estimate gains a false match (+1/128) with odds under 0.002, against MinHash's own
    /// error of ±0.044 at Jaccard 0.5; and the signatures curate stores for verification
    /// take a quarter of the bytes of whole minimums (256 an input: 6 GB at 25M inputs).
    pub fn short(signature: &[u64]) -> Vec<u16> {
        signature.iter().map(|&v| v as u16).collect()
    }

    /// Whether two short signatures estimate a Jaccard similarity of at least the
    /// threshold.
    pub fn similar(&self, a: &[u16], b: &[u16]) -> bool {
        let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
        same as f64 / a.len() as f64 >= self.threshold
    }

    /// For each text, the index of its cluster's first member (itself when it has no
    /// near-duplicate before it). In each band a text is compared with the first text
    /// that had its key; a similar pair joins their clusters. (`curate::clusters` does
    /// the same over texts on disk.)
    pub fn clusters(&self, texts: &[&str]) -> Vec<usize> {
        use rayon::prelude::*;
        let sigs: Vec<Vec<u64>> = texts.par_iter().map(|t| self.signature(t)).collect();
        let shorts: Vec<Vec<u16>> = sigs.iter().map(|s| Self::short(s)).collect();
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
    grams: HashSet<u64>,
}

impl Contamination {
    pub fn new<'a>(eval_texts: impl Iterator<Item = &'a str>, n: usize) -> Self {
        let mut grams = HashSet::new();
        for t in eval_texts {
            grams.extend(shingles(&words(t), n));
        }
        Contamination { n, grams }
    }

    pub fn is_empty(&self) -> bool {
        self.grams.is_empty()
    }

    pub fn contaminated(&self, text: &str) -> bool {
        let w = words(text);
        if w.len() < self.n {
            return self.grams.contains(&hash64(&w[..]));
        }
        w.windows(self.n).any(|g| self.grams.contains(&hash64(g)))
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
    fn thirteen_gram_overlap_is_contamination() {
        let eval = ["Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack How much do you have to pay to buy each pack?"];
        let c = Contamination::new(eval.iter().copied(), 13);
        // Shares a 13-word window (reworded start, same middle).
        assert!(c.contaminated("Look: if there is a discount of 25 dollars on each pack how much do you have to pay, friend?"));
        assert!(!c.contaminated("Each pack of pens costs 7 dollars. How much do 3 packs cost?"));
        let short = Contamination::new(["How are you"].into_iter(), 13);
        assert!(short.contaminated("how are YOU?"));
        assert!(!short.contaminated("how are we"));
    }
}
