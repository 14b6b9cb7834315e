//! Checkpoints: `finetune/checkpoint-NNNNNN/` with the trainable weights
//! (model.safetensors), the optimizer moments (optimizer.safetensors) and state.json (step,
//! config hash, the loss curve so far). The folder is written under a temp name and
//! renamed, so a checkpoint either exists whole or not at all; older ones are removed
//! after a newer one is in place. The data position and the shuffling need no state of
//! their own: the batch order is a function of the seed, so the step says where to go on.
//! With mutual learning, the peer's weights and moments are saved beside them
//! (peer.safetensors, peer-optimizer.safetensors); with hidden-state KD, its maps
//! (hidden-kd-projections.safetensors, their moments in optimizer.safetensors).

use super::optim::AdamW;
use crate::io::atomic::write_json;
use crate::llama::Decoder;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps done.
    pub step: usize,
    /// The finetune config hash and input digests it was made under.
    pub config_hash: String,
    pub inputs_hash: String,
    pub val_before: f64,
    pub losses: Vec<f64>,
    pub metrics: Vec<String>,
    /// (step, val loss) of every evaluation during training.
    #[serde(default)]
    pub evals: Vec<(usize, f64)>,
    /// The evaluation with the lowest val loss; its weights are in `best/`.
    #[serde(default)]
    pub best: Option<(usize, f64)>,
}

/// The trainable weights by name, as saved in checkpoints and `best/`.
fn trainable(model: &Decoder) -> HashMap<String, Tensor> {
    model
        .vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

const PEER_WEIGHTS: &str = "peer.safetensors";
const PROJECTIONS: &str = "hidden-kd-projections.safetensors";
const PEER_OPTIMIZER: &str = "peer-optimizer.safetensors";

fn name(step: usize) -> String {
    format!("checkpoint-{step:06}")
}

/// A second model trained in the same run (the mutual-learning peer) and its optimizer.
pub type Companion<'a, O> = Option<(&'a Decoder, O)>;

/// Trainable tensors of the run that are not the student's weights (hidden-state KD's
/// maps); their moments are in the student's optimizer.
pub type Extra<'a> = &'a [(String, Var)];

/// Write a checkpoint for `state.step` (with the peer's weights and moments when there is
/// one), then remove older ones.
pub fn save(
    dir: &Path,
    model: &Decoder,
    opt: &AdamW,
    peer: Companion<&AdamW>,
    extra: Extra,
    state: &State,
) -> Result<PathBuf> {
    let final_dir = dir.join(name(state.step));
    let tmp = dir.join(format!("{}.tmp-{}", name(state.step), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let weights = trainable(model);
    candle_core::safetensors::save(&weights, tmp.join("model.safetensors"))
        .context("cannot write the checkpoint weights")?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    if let Some((peer, peer_opt)) = peer {
        candle_core::safetensors::save(&trainable(peer), tmp.join(PEER_WEIGHTS))
            .context("cannot write the peer's checkpoint weights")?;
        peer_opt.save(&tmp.join(PEER_OPTIMIZER))?;
    }
    if !extra.is_empty() {
        let tensors: HashMap<String, Tensor> = extra
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, tmp.join(PROJECTIONS))
            .context("cannot write the hidden-state maps")?;
    }
    write_json(&tmp.join("state.json"), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    for old in list(dir)? {
        if old.0 < state.step {
            std::fs::remove_dir_all(&old.1)
                .with_context(|| format!("cannot remove {}", old.1.display()))?;
        }
    }
    Ok(final_dir)
}

/// Finished checkpoints in a folder, by step.
fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("state.json").is_file())
        .filter_map(|p| {
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((step, p))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The newest checkpoint made under this config and these inputs, if any.
pub fn latest(
    dir: &Path,
    config_hash: &str,
    inputs_hash: &str,
) -> Result<Option<(PathBuf, State)>> {
    for (_, path) in list(dir)?.into_iter().rev() {
        let text = std::fs::read_to_string(path.join("state.json"))?;
        let Ok(state) = serde_json::from_str::<State>(&text) else {
            continue;
        };
        if state.config_hash == config_hash && state.inputs_hash == inputs_hash {
            return Ok(Some((path, state)));
        }
    }
    Ok(None)
}

/// Keep the trainable weights as the best so far: `dir/best/model.safetensors`, written
/// under a temp name and renamed.
pub fn save_best(dir: &Path, model: &Decoder) -> Result<()> {
    let best = dir.join("best");
    std::fs::create_dir_all(&best)?;
    let weights = trainable(model);
    let target = best.join("model.safetensors");
    let tmp = crate::io::atomic::temp_path(&target);
    candle_core::safetensors::save(&weights, &tmp).context("cannot write the best weights")?;
    std::fs::rename(&tmp, &target)?;
    Ok(())
}

/// Load the best weights back into the model (before export).
pub fn load_best(dir: &Path, model: &Decoder) -> Result<()> {
    load_weights(&dir.join("best/model.safetensors"), model)
}

fn load_weights(file: &Path, model: &Decoder) -> Result<()> {
    load_vars(file, &model.vars, model.device())
}

fn load_vars(file: &Path, vars: &[(String, Var)], device: &candle_core::Device) -> Result<()> {
    let tensors = candle_core::safetensors::load(file, device)
        .with_context(|| format!("cannot read {}", file.display()))?;
    for (n, var) in vars {
        let t = tensors
            .get(n)
            .with_context(|| format!("{}: no weight {n}", file.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "{}: {n} has shape {:?}, the model {:?}",
                file.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(t)?;
    }
    Ok(())
}

/// Load a checkpoint's weights into the model and its moments into the optimizer (and
/// the peer's into the peer's).
pub fn restore(
    path: &Path,
    state: &State,
    model: &Decoder,
    opt: &mut AdamW,
    peer: Companion<&mut AdamW>,
    extra: Extra,
) -> Result<()> {
    load_weights(&path.join("model.safetensors"), model)?;
    if !extra.is_empty() {
        load_vars(&path.join(PROJECTIONS), extra, model.device())?;
    }
    opt.load(&path.join("optimizer.safetensors"), state.step)?;
    if let Some((peer, peer_opt)) = peer {
        load_weights(&path.join(PEER_WEIGHTS), peer)?;
        peer_opt.load(&path.join(PEER_OPTIMIZER), state.step)?;
    }
    Ok(())
}
