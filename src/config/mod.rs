//! The TOML job config: sections [data] [task] [teacher] [generate] [curate] [student]
//! [finetune] [eval] and optionally [synthesize] and [[ensemble]], one file each here,
//! every field with its default beside it and a one-line why; unknown keys are errors.
//! `resolve` applies CLI overrides once, fills the defaults that depend on the task kind and
//! the model pair (recipe.rs), and validates; then every stage reads the result.
//! stage.rs names the stages and decides what each one's hash covers.

mod curate;
mod data;
mod eval;
mod export;
mod finetune;
mod generate;
mod recipe;
mod stage;
mod student;
mod synthesize;
mod task;
mod teacher;

pub use curate::{CurateConfig, GoldRule, KeepRationales};
pub use data::DataConfig;
pub use eval::{EvalConfig, EvalModel, StudentDecode, TeacherSource, ViewChoice};
pub use export::{ExportConfig, GgufType};
pub use finetune::{
    default_targets, parse_device, Divergence, FeatureLoss, FinetuneConfig, HiddenKdConfig,
    LabelSource, LiveTeacherConfig, LoraConfig, MutualConfig, Objective, Precision, RelationLoss,
    SampleWeights, TokenKd,
};
pub use generate::GenerateConfig;
pub use recipe::SameVocabulary;
pub use stage::Stage;
pub use student::StudentConfig;
pub use synthesize::SynthesizeConfig;
pub use task::{TaskConfig, TaskKind};
pub use teacher::{LocalEngine, Price, TeacherConfig, TeacherKind};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the run: outputs go to `<runs_dir>/<name>/<stage>/`.
    #[serde(default = "d_name")]
    pub name: String,
    /// Where runs are written, relative to the working directory.
    #[serde(default = "d_runs_dir")]
    pub runs_dir: PathBuf,
    /// One seed for splits, shuffling and sampling, so a run can be repeated exactly.
    #[serde(default)]
    pub seed: u64,
    pub data: DataConfig,
    pub task: TaskConfig,
    pub teacher: TeacherConfig,
    /// More teachers (`[[ensemble]]`, each a full teacher section, local and API mixed):
    /// every input is answered by each; curate votes across them, weighted by `weight`.
    #[serde(default)]
    pub ensemble: Vec<TeacherConfig>,
    #[serde(default)]
    pub generate: GenerateConfig,
    #[serde(default)]
    pub curate: CurateConfig,
    pub student: StudentConfig,
    #[serde(default)]
    pub finetune: FinetuneConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    /// Optional: write the inputs with the teacher from a few seed examples first.
    #[serde(default)]
    pub synthesize: Option<SynthesizeConfig>,
    /// Optional: write the student as GGUF files too (`kdpipe export`; `run` after finetune).
    #[serde(default)]
    pub export: Option<ExportConfig>,
}

fn d_name() -> String {
    "default".into()
}
fn d_runs_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_half() -> f64 {
    0.5
}
fn d_true() -> bool {
    true
}

/// Overrides from the command line; each `None` keeps the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub eval_files: Vec<PathBuf>,
    pub eval_teacher: Option<TeacherSource>,
    pub eval_models: Option<Vec<EvalModel>>,
    pub name: Option<String>,
    pub runs_dir: Option<PathBuf>,
    pub limit: Option<usize>,
    pub teacher_model: Option<String>,
    pub student_model: Option<String>,
    pub max_steps: Option<usize>,
}

impl Config {
    /// The optional sections this config leaves out, as commented TOML with their
    /// defaults: `--print-config` shows the knobs a user could turn on.
    pub fn unset_sections(&self) -> Result<String> {
        let mut out = String::new();
        let mut add = |name: &str, text: String| {
            out.push_str(&format!(
                "\n# [{name}] is not set; added, it starts from these defaults:\n# [{name}]\n"
            ));
            for line in text.lines() {
                out.push_str(&format!("# {line}\n"));
            }
        };
        if self.finetune.live_teacher.is_none() {
            let defaults: LiveTeacherConfig = toml::from_str("")?;
            add("finetune.live_teacher", toml::to_string_pretty(&defaults)?);
        }
        if self.finetune.mutual.is_none() {
            let defaults: MutualConfig = toml::from_str("")?;
            add("finetune.mutual", toml::to_string_pretty(&defaults)?);
        }
        if self.finetune.hidden_kd.is_none() {
            let defaults: HiddenKdConfig = toml::from_str("")?;
            add("finetune.hidden_kd", toml::to_string_pretty(&defaults)?);
        }
        if self.export.is_none() {
            add("export", toml::to_string_pretty(&ExportConfig::default())?);
        }
        Ok(out)
    }

    /// Read a config file, apply overrides, fill the defaults that follow the task kind and
    /// the model pair (`same_vocabulary` compares two models' vocabularies) and validate,
    /// naming the file in every error.
    pub fn resolve(
        path: &Path,
        overrides: &Overrides,
        same_vocabulary: SameVocabulary,
    ) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "invalid config {}: {}",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        if let Some(v) = &overrides.name {
            cfg.name = v.clone();
        }
        if let Some(v) = &overrides.runs_dir {
            cfg.runs_dir = v.clone();
        }
        if let Some(v) = overrides.limit {
            cfg.data.limit = Some(v);
        }
        if let Some(v) = &overrides.teacher_model {
            cfg.teacher.model = v.clone();
        }
        if let Some(v) = &overrides.student_model {
            cfg.student.model = v.clone();
        }
        if let Some(v) = overrides.max_steps {
            cfg.finetune.max_steps = Some(v);
        }
        if !overrides.eval_files.is_empty() {
            cfg.eval.files = overrides.eval_files.clone();
        }
        if let Some(v) = overrides.eval_teacher {
            cfg.eval.teacher = v;
        }
        if let Some(v) = &overrides.eval_models {
            cfg.eval.models = v.clone();
        }
        // With [synthesize] and no inputs of its own, generate reads the synthesized ones.
        if cfg.synthesize.is_some() && cfg.data.inputs.is_empty() {
            cfg.data.inputs = vec![cfg.synthesized_inputs()];
        }
        recipe::fill_defaults(&mut cfg, same_vocabulary);
        cfg.validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.task.kind == TaskKind::Labels && self.task.labels.len() < 2 {
            bail!("[task] kind = \"labels\" needs `labels` with at least two labels");
        }
        self.validate_teacher()?;
        if self.data.inputs.is_empty() {
            bail!("[data] inputs is empty: name at least one JSONL, Parquet or CSV file (or add [synthesize] to have the teacher write them)");
        }
        if let Some(s) = &self.synthesize {
            if s.seeds.is_empty() || s.target == 0 || s.seed_examples == 0 {
                bail!("[synthesize] needs seeds, and target and seed_examples of at least 1");
            }
            if !(0.0..=1.0).contains(&s.near_dup_threshold) || s.min_chars > s.max_chars {
                bail!(
                    "[synthesize] near_dup_threshold must be in [0, 1] and min_chars ≤ max_chars"
                );
            }
        }
        let c = &self.curate;
        if !(0.0..=1.0).contains(&c.min_agreement) || !(0.0..=1.0).contains(&c.min_confidence) {
            bail!("[curate] min_agreement and min_confidence are shares in [0, 1]");
        }
        if !(0.0..=1.0).contains(&c.near_dup_threshold) || c.shingle_words == 0 {
            bail!("[curate] near_dup_threshold must be in [0, 1] and shingle_words at least 1");
        }
        if c.decontaminate_ngram == 0 {
            bail!("[curate] decontaminate_ngram must be at least 1");
        }
        let s = self.curate.split;
        if s.iter().any(|x| *x < 0.0) || (s.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            bail!("[curate] split must be three non-negative shares summing to 1, got {s:?}");
        }
        if !(0.0..=1.0).contains(&self.finetune.alpha) {
            bail!(
                "[finetune] alpha must be in [0, 1], got {}",
                self.finetune.alpha
            );
        }
        let f = &self.finetune;
        parse_device(&f.device)?;
        if f.grad_accum == 0 || f.batch_size == 0 {
            bail!("[finetune] batch_size and grad_accum must be at least 1");
        }
        if !(0.0..1.0).contains(&f.warmup_ratio) || !(0.0..=1.0).contains(&f.min_lr_ratio) {
            bail!("[finetune] warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]");
        }
        if !(f.learning_rate > 0.0 && f.learning_rate.is_finite()) {
            bail!(
                "[finetune] learning_rate must be greater than 0, got {}",
                f.learning_rate
            );
        }
        if f.max_seq_len < 16 {
            bail!(
                "[finetune] max_seq_len must be at least 16 tokens (prompt and reply share it), got {}",
                f.max_seq_len
            );
        }
        if let Some(l) = &f.lora {
            if l.rank == 0 || l.alpha <= 0.0 || !(0.0..1.0).contains(&l.dropout) {
                bail!("[finetune.lora] rank must be at least 1, alpha greater than 0 and dropout in [0, 1)");
            }
        }
        if f.kd_token_weight() < 0.0 {
            bail!("[finetune] kd_token_weight must be ≥ 0");
        }
        if f.kd_weight < 0.0 || f.kd_temperature <= 0.0 || !(0.0..=1.0).contains(&f.jsd_beta) {
            bail!("[finetune] kd_weight must be ≥ 0, kd_temperature > 0 and jsd_beta in [0, 1]");
        }
        if f.labels == LabelSource::Gold && self.curate.gold == GoldRule::Off {
            bail!("[finetune] labels = \"gold\" needs [curate] gold on (\"flag\"): the rows' agreement with gold decides which of the teacher's rationales are trained");
        }
        if let Some(live) = &f.live_teacher {
            self.validate_live_teacher(live)?;
        }
        if let Some(m) = &f.mutual {
            self.validate_mutual(m)?;
        }
        if let Some(h) = &f.hidden_kd {
            validate_hidden_kd(h)?;
        }
        if !["train", "val", "test"].contains(&self.eval.split.as_str()) {
            bail!(
                "[eval] split must be train, val or test, got {:?}",
                self.eval.split
            );
        }
        self.validate_eval()
    }

    fn validate_live_teacher(&self, live: &LiveTeacherConfig) -> Result<()> {
        let f = &self.finetune;
        if !(0.0..=1.0).contains(&live.on_policy) {
            bail!("[finetune.live_teacher] on_policy is the share λ of rows sampled from the student, in [0, 1]; got {}", live.on_policy);
        }
        if live.online && f.token_kd == TokenKd::Cross {
            bail!("[finetune.live_teacher] online = true scores the rationales with the live teacher's tokens, which must be the student's: it does not combine with [finetune] token_kd = \"cross\"\nhint: drop online (the stored top-k is aligned across tokenizers), or use a teacher of the student's family");
        }
        if live.online && f.kd_token_weight() <= 0.0 {
            bail!("[finetune.live_teacher] online = true scores the rationales for token-level KD, which is off\nhint: set [finetune] kd_token_weight (1.0 weighs it as the CE terms)");
        }
        if live.top_k == 0 || live.max_new_tokens == 0 || live.samples_per_prompt == 0 {
            bail!("[finetune.live_teacher] top_k, max_new_tokens and samples_per_prompt must be at least 1");
        }
        if live.on_policy > 0.0 && live.max_new_tokens + 8 > f.max_seq_len {
            bail!("[finetune.live_teacher] max_new_tokens = {} leaves no room for the prompt in [finetune] max_seq_len = {}\nhint: raise max_seq_len or lower max_new_tokens", live.max_new_tokens, f.max_seq_len);
        }
        let negative = |x: f64| x.is_nan() || x.is_infinite() || x < 0.0;
        if negative(live.temperature) || negative(live.weight) {
            bail!("[finetune.live_teacher] temperature and weight must be ≥ 0");
        }
        if live.refresh_every == 0 {
            bail!("[finetune.live_teacher] refresh_every must be at least 1 (1: sample from the current weights every step)");
        }
        if live.on_policy > 0.0 && !f.checkpoint_every.is_multiple_of(live.refresh_every) {
            bail!("[finetune] checkpoint_every = {} is not a multiple of [finetune.live_teacher] refresh_every = {}: a run resumed from such a checkpoint would sample from other weights than an uninterrupted one\nhint: make checkpoint_every a multiple of refresh_every", f.checkpoint_every, live.refresh_every);
        }
        Ok(())
    }

    fn validate_mutual(&self, m: &MutualConfig) -> Result<()> {
        if m.weight.is_nan() || m.weight < 0.0 || m.temperature.is_nan() || m.temperature <= 0.0 {
            bail!("[finetune.mutual] weight must be ≥ 0 and temperature > 0");
        }
        if m.top_k == 0 {
            bail!("[finetune.mutual] top_k must be at least 1");
        }
        let peer = m.peer.as_deref().unwrap_or(&self.student.model);
        if peer == self.student.model && self.finetune.lora.is_none() {
            bail!("[finetune.mutual] the peer is the student's own model {peer:?} and both train every weight: they would start equal, see the same batches and stay equal, so neither learns anything from the other\nhint: train with LoRA ([finetune] lora = {{ rank = 16, alpha = 32 }}: the peer's adapters get their own initialization), or set [finetune.mutual] peer to another model of the student's family");
        }
        Ok(())
    }

    fn validate_eval(&self) -> Result<()> {
        let e = &self.eval;
        if e.models.is_empty() {
            bail!(
                "[eval] models is empty: name at least one of \"student\", \"base\", \"teacher\""
            );
        }
        if e.student_decode == StudentDecode::LabelScores && self.task.kind != TaskKind::Labels {
            bail!("[eval] student_decode = \"label_scores\" needs a label task ([task] kind = \"labels\")");
        }
        if e.student_decode == StudentDecode::LabelScores && self.student_reasons_at_eval() {
            bail!("[eval] student_decode = \"label_scores\" scores the labels right after the prompt, so it needs student_view = \"label\" (or \"auto\"), not \"rationale\"");
        }
        if e.parallel == 0 {
            bail!("[eval] parallel must be at least 1");
        }
        if e.min_accuracy.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            bail!("[eval] min_accuracy is a share in [0, 1] (0.6 for 60 %)");
        }
        if !e.files.is_empty() && self.data.gold_field.is_none() {
            bail!("[eval] files need gold answers: set [data] gold_field to the field that holds them");
        }
        Ok(())
    }

    /// Every teacher, `[teacher]` first: teacher i writes samples i·k … i·k + k − 1 of an
    /// input (k = `[generate] samples`).
    pub fn teachers(&self) -> Vec<&TeacherConfig> {
        std::iter::once(&self.teacher)
            .chain(&self.ensemble)
            .collect()
    }

    fn validate_teacher(&self) -> Result<()> {
        let g = &self.generate;
        let mut models = std::collections::HashSet::new();
        for t in self.teachers() {
            if !models.insert(&t.model) {
                bail!("[[ensemble]] names the teacher {:?} twice: rows are told apart by the teacher's model", t.model);
            }
            if !(t.weight > 0.0 && t.weight.is_finite()) {
                bail!("teacher {:?}: weight must be greater than 0", t.model);
            }
            self.validate_one_teacher(t)?;
        }
        if g.samples == 0 {
            bail!("[generate] samples must be at least 1");
        }
        Ok(())
    }

    fn validate_one_teacher(&self, t: &TeacherConfig) -> Result<()> {
        let g = &self.generate;
        if g.samples == 0 {
            bail!("[generate] samples must be at least 1");
        }
        if g.samples > 1 && t.temperature <= 0.0 {
            bail!(
                "[generate] samples = {} needs [teacher] temperature > 0: greedy decoding writes the same rationale every time",
                g.samples
            );
        }
        if g.token_topk() > 20 {
            bail!(
                "[generate] token_topk must be at most 20, got {}",
                g.token_topk()
            );
        }
        if t.parallel == 0 {
            bail!("[teacher] parallel must be at least 1");
        }
        if t.kind == TeacherKind::Openai {
            if t.base_url.as_deref().unwrap_or("").is_empty() {
                bail!(
                    "[teacher] kind = \"openai\" needs base_url, e.g. \"http://127.0.0.1:8000/v1\""
                );
            }
            if t.max_in_flight == 0 {
                bail!("[teacher] max_in_flight must be at least 1");
            }
            if t.timeout_s.is_nan() || t.timeout_s <= 0.0 {
                bail!("[teacher] timeout_s must be positive");
            }
        }
        Ok(())
    }

    /// Whether the student writes its rationale before the answer at eval ("auto"
    /// resolved): a numeric task's step-by-step student reasons first (a small model cannot
    /// do the arithmetic in the answer tokens alone); everything else answers alone.
    pub fn student_reasons_at_eval(&self) -> bool {
        match self.eval.student_view {
            ViewChoice::Auto => {
                self.task.kind == TaskKind::Numeric
                    && self.finetune.objective == Objective::StepByStep
            }
            ViewChoice::Label => false,
            ViewChoice::Rationale => true,
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(&self.name)
    }

    /// The folder a stage writes.
    pub fn stage_dir(&self, stage: Stage) -> PathBuf {
        self.run_dir().join(stage.as_str())
    }

    /// The folder the trained student is exported to (a Hugging Face model folder).
    pub fn student_dir(&self) -> PathBuf {
        self.run_dir().join("student")
    }

    /// Where synthesize writes the inputs it accepted.
    pub fn synthesized_inputs(&self) -> PathBuf {
        self.stage_dir(Stage::Synthesize).join("inputs.jsonl")
    }

    /// The prompt template for this task.
    pub fn prompt_path(&self) -> PathBuf {
        self.task.prompt.clone().unwrap_or_else(|| {
            let kind = match self.task.kind {
                TaskKind::Numeric => "numeric",
                TaskKind::Labels => "labels",
            };
            PathBuf::from(format!("prompts/{kind}.md"))
        })
    }
}

/// `[finetune.hidden_kd]`: non-negative weights, at least one on, layers from 1 (layer
/// counts are checked against the models when they load).
fn validate_hidden_kd(h: &HiddenKdConfig) -> Result<()> {
    let bad = |x: f64| x.is_nan() || x.is_infinite() || x < 0.0;
    if bad(h.feature_weight) || bad(h.relation_weight) {
        bail!("[finetune.hidden_kd] feature_weight and relation_weight must be ≥ 0");
    }
    if h.feature_weight == 0.0 && h.relation_weight == 0.0 {
        bail!("[finetune.hidden_kd] asks for nothing: feature_weight and relation_weight are both 0\nhint: set feature_weight (FitNets-style hidden states) or relation_weight (RKD), or remove the section");
    }
    if let Some(pair) = h.layers.iter().find(|p| p[0] == 0 || p[1] == 0) {
        bail!("[finetune.hidden_kd] layers pair {pair:?}: layer l is the output of the first l blocks, so layers start at 1 (0 would be the token embeddings, which hold no teacher knowledge)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_knobs_do_not_change_the_generate_hash() {
        let base: Config = toml::from_str(MINIMAL).unwrap();
        let mut faster = base.clone();
        faster.teacher.parallel = 64;
        faster.teacher.max_in_flight = 99;
        faster.teacher.timeout_s = 5.0;
        assert_eq!(
            base.stage_view(Stage::Generate),
            faster.stage_view(Stage::Generate)
        );
        let mut other = base.clone();
        other.teacher.max_tokens += 1;
        assert_ne!(
            base.stage_view(Stage::Generate),
            other.stage_view(Stage::Generate)
        );
        other = base.clone();
        other.teacher.engine = LocalEngine::Mistralrs;
        assert_ne!(
            base.stage_view(Stage::Generate),
            other.stage_view(Stage::Generate)
        );
    }

    const MINIMAL: &str = r#"
[data]
inputs = ["x.jsonl"]
input_field = "q"
[task]
kind = "numeric"
[teacher]
model = "t.gguf"
[student]
model = "s.gguf"
"#;

    #[test]
    fn a_numeric_step_by_step_student_reasons_at_eval_unless_told_otherwise() {
        let mut cfg: Config = toml::from_str(MINIMAL).unwrap();
        assert!(cfg.student_reasons_at_eval());
        assert_eq!(cfg.eval.new_tokens(true), 160);
        cfg.finetune.objective = Objective::Distill;
        assert!(!cfg.student_reasons_at_eval(), "no rationale learned");
        assert_eq!(cfg.eval.new_tokens(false), 12);
        cfg.finetune.objective = Objective::StepByStep;
        cfg.task.kind = TaskKind::Labels;
        cfg.task.labels = vec!["a".into(), "b".into()];
        assert!(!cfg.student_reasons_at_eval());
        cfg.eval.student_view = ViewChoice::Rationale;
        assert!(cfg.student_reasons_at_eval());
        cfg.eval.student_decode = StudentDecode::LabelScores;
        let err = cfg.validate_eval().unwrap_err().to_string();
        assert!(err.contains("student_view"), "{err}");
    }

    #[test]
    fn gold_labels_need_the_gold_rule_on() {
        let text = format!("{MINIMAL}[finetune]\nlabels = \"gold\"\n");
        let mut cfg: Config = toml::from_str(&text).unwrap();
        assert_eq!(cfg.finetune.labels, LabelSource::Gold);
        cfg.validate().unwrap();
        cfg.curate.gold = GoldRule::Off;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("labels") && err.contains("[curate] gold"),
            "{err}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg: Config = toml::from_str(MINIMAL).unwrap();
        assert_eq!(cfg.finetune.alpha, 0.5);
        assert_eq!(cfg.finetune.labels, LabelSource::Teacher);
        assert_eq!(cfg.curate.split, [0.8, 0.1, 0.1]);
        assert_eq!(cfg.eval.split, "test");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[student]", "[student]\nmodle = 1");
        let err = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(err.contains("modle"), "{err}");
    }
}
