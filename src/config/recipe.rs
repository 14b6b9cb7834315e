//! Defaults that follow the evidence for a task kind and a model pair
//! (`bench-results/quality.md`), picked once in `Config::resolve` for the fields a config
//! leaves unset, so every stage, stage hash and `--print-config` sees the same numbers.
//!
//! Token-level KD (`[generate] token_topk`, `[finetune] kd_token_weight`) is on by
//! default where it was measured to help: a **numeric task** whose **one local teacher**
//! has **the student's vocabulary**. On SVAMP (teacher Qwen2.5-Coder-1.5B, student
//! Qwen2.5-Coder-0.5B) it took the step-by-step student from 46.4 % to 57.7 % (61.9 %
//! with the calculator, 2026-12-05e), and with three samples an input to 67.0 % with the
//! calculator, above the teacher's few-shot 64.9 %, where its step-matched control
//! without the KD term scored 60.8 % (9 rows to 1 without the calculator, p 0.02;
//! 2026-12-06b). On TweetEval emotion, a label task, it tied or trailed its control
//! (70.6 against 73.5 %, 2026-12-05g), so label tasks keep it off. Across tokenizers
//! (`token_kd = "cross"`, 1.5B → SmolLM2-135M on SVAMP) the KD student never wrote its
//! answer line, where its control scored 30.9 % with the calculator (2026-12-07b), so
//! other vocabularies keep it off too.

use super::{Config, TaskKind, TeacherKind};
use std::path::Path;

/// Alternatives a token the teacher keeps when token-level KD is the default: the most
/// an OpenAI-compatible API returns, and what the measured runs used.
pub const DEFAULT_TOKEN_TOPK: usize = 20;

/// Whether two models' token ids mean the same tokens (GGUF files or Hugging Face
/// folders): the model layer answers it (`llama::vocab::same_vocabulary`), which the
/// config layer must not name.
pub type SameVocabulary<'a> = &'a dyn Fn(&str, &str) -> anyhow::Result<bool>;

/// Fill `[generate] token_topk` and `[finetune] kd_token_weight` where the config leaves
/// them unset; values the config sets are kept.
pub fn fill_defaults(cfg: &mut Config, same_vocabulary: SameVocabulary) {
    if cfg.generate.token_topk.is_some() && cfg.finetune.kd_token_weight.is_some() {
        return;
    }
    let measured = token_kd_is_measured_default(cfg, same_vocabulary);
    if cfg.generate.token_topk.is_none() {
        cfg.generate.token_topk = Some(if measured { DEFAULT_TOKEN_TOPK } else { 0 });
    }
    if cfg.finetune.kd_token_weight.is_none() {
        // Off where the teacher keeps no top-k (set to 0 by hand): nothing to learn from.
        let on = measured && cfg.generate.token_topk() > 0;
        cfg.finetune.kd_token_weight = Some(if on { 1.0 } else { 0.0 });
    }
}

/// A numeric task, one teacher that runs here, and a student that reads the teacher's
/// token ids as its own. Both model files must be there to compare their vocabularies;
/// where one is missing or unreadable the default stays off (the stage that loads it
/// reports the problem).
fn token_kd_is_measured_default(cfg: &Config, same_vocabulary: SameVocabulary) -> bool {
    let local_teacher = cfg.teacher.kind != TeacherKind::Openai && cfg.ensemble.is_empty();
    if cfg.task.kind != TaskKind::Numeric || !local_teacher {
        return false;
    }
    let (teacher, student) = (&cfg.teacher.model, &cfg.student.model);
    if !Path::new(teacher).exists() || !Path::new(student).exists() {
        return false;
    }
    same_vocabulary(teacher, student).unwrap_or(false)
}
