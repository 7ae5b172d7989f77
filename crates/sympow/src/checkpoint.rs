//! Checkpoints: safetensors files holding parameters, optimizer moments and the run state.
//!
//! Tensors are f32, named as in [`crate::model::layout`] (`opt.m.` and `opt.v.` prefixes for
//! the AdamW moments). The safetensors metadata has one key, `sympow`, whose value is a JSON
//! object (sorted keys, so identical runs write identical files) with the format tag, the
//! complete config (TOML), the step and counters, and a CRC-32 of all tensor bytes: a
//! bit-flipped or truncated file is rejected with a message rather than loaded. Files are written to a
//! temporary name, synced and renamed: a crash leaves the previous checkpoint intact.

use crate::config::Config;
use crate::model::layout;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

const FORMAT: &str = "sympow-checkpoint-1";
const META_KEY: &str = "sympow";

/// A checkpoint error, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No such file.
    #[error("{0}: no checkpoint there")]
    Missing(String),
    /// Read or write failure.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// The file is not a valid sympow checkpoint.
    #[error("{path}: corrupt checkpoint: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Host tensors in layout order.
pub type Tensors = Vec<Vec<f32>>;

/// Everything a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The run's configuration.
    pub config: Config,
    /// Completed optimizer steps.
    pub step: u64,
    /// Steps skipped for non-finite loss or gradients, in total.
    pub skipped_steps: u64,
    /// Parameters, in layout order.
    pub params: Vec<Vec<f32>>,
    /// AdamW first and second moments, in layout order (absent in weights-only files).
    pub moments: Option<(Tensors, Tensors)>,
}

fn bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `ckpt` to `path` atomically (temporary file, fsync, rename).
pub fn save(path: &Path, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
    let infos = layout(&ckpt.config);
    assert_eq!(
        infos.len(),
        ckpt.params.len(),
        "parameter count matches the layout"
    );
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (info, p) in infos.iter().zip(&ckpt.params) {
        named.push((info.name.clone(), info.shape.clone(), bytes(p)));
    }
    if let Some((m, v)) = &ckpt.moments {
        for (prefix, ts) in [("opt.m.", m), ("opt.v.", v)] {
            for (info, t) in infos.iter().zip(ts) {
                named.push((
                    format!("{prefix}{}", info.name),
                    info.shape.clone(),
                    bytes(t),
                ));
            }
        }
    }
    save_named(path, ckpt, &named)
}

/// Writes the tensors `named` (name, shape, little-endian f32 bytes) with `ckpt`'s config and
/// counters as a checkpoint file, atomically.
fn save_named(
    path: &Path,
    ckpt: &Checkpoint,
    named: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<(), CheckpointError> {
    let io = |p: &Path, err| CheckpointError::Io {
        path: p.display().to_string(),
        err,
    };
    let mut crc = crc32fast::Hasher::new();
    named.iter().for_each(|(_, _, b)| crc.update(b));
    let fields: BTreeMap<&str, String> = [
        ("format", FORMAT.to_string()),
        ("config", ckpt.config.to_toml()),
        ("step", ckpt.step.to_string()),
        ("skipped_steps", ckpt.skipped_steps.to_string()),
        ("crc32", crc.finalize().to_string()),
    ]
    .into_iter()
    .collect();
    let meta: HashMap<String, String> = HashMap::from([(
        META_KEY.to_string(),
        serde_json::to_string(&fields).expect("strings serialise"),
    )]);
    let views: Vec<(String, TensorView<'_>)> = named
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent tensor"),
            )
        })
        .collect();
    let data =
        safetensors::serialize(views, &Some(meta)).map_err(|e| CheckpointError::Corrupt {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    write_atomic(path, &data).map_err(|e| io(path, e))
}

/// Writes `data` to `path` via a temporary file in the same directory, synced, renamed, and the
/// directory synced: either the old file or the complete new one exists, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and verifies a checkpoint.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let p = path.display().to_string();
    if !path.exists() {
        return Err(CheckpointError::Missing(p));
    }
    let corrupt = |why: String| CheckpointError::Corrupt {
        path: p.clone(),
        why,
    };
    let data = std::fs::read(path).map_err(|err| CheckpointError::Io {
        path: p.clone(),
        err,
    })?;
    let (_, header) = SafeTensors::read_metadata(&data)
        .map_err(|e| corrupt(format!("not a safetensors file ({e})")))?;
    let raw = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| corrupt("no sympow metadata".into()))?;
    let meta: BTreeMap<String, String> = serde_json::from_str(raw).map_err(|e| {
        corrupt(format!(
            "sympow metadata is not a JSON object of strings ({e})"
        ))
    })?;
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| corrupt(format!("metadata lacks `{k}`")))
    };
    if get("format")? != FORMAT {
        return Err(corrupt(format!(
            "format {:?}, expected {FORMAT:?}",
            get("format")?
        )));
    }
    let config =
        Config::from_toml(&get("config")?).map_err(|e| corrupt(format!("embedded config: {e}")))?;
    let num = |k: &str| -> Result<u64, CheckpointError> {
        get(k)?
            .parse()
            .map_err(|_| corrupt(format!("metadata `{k}` is not a number")))
    };
    let (step, skipped_steps, want_crc) = (num("step")?, num("skipped_steps")?, num("crc32")?);
    let st = SafeTensors::deserialize(&data).map_err(|e| corrupt(e.to_string()))?;
    let infos = layout(&config);
    let mut crc = crc32fast::Hasher::new();
    let mut read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, CheckpointError> {
        let t = st
            .tensor(name)
            .map_err(|_| corrupt(format!("tensor `{name}` missing")))?;
        // a fused projection saved before its alignment padding (`Dims::qkv_pad`): fewer rows,
        // to which the padding's rows are added as zeros (their outputs are never read)
        let unpadded_qkv = (name.ends_with(".qkv.weight") || name.ends_with(".qkv.bias"))
            && t.shape().len() == shape.len()
            && t.shape()[1..] == shape[1..]
            && t.shape()[0] < shape[0]
            && shape[0] - t.shape()[0] < 8;
        if t.dtype() != Dtype::F32 || (t.shape() != shape && !unpadded_qkv) {
            return Err(corrupt(format!(
                "tensor `{name}` is {:?} {:?}, the config needs F32 {shape:?}",
                t.dtype(),
                t.shape()
            )));
        }
        crc.update(t.data());
        let mut x: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        x.resize(shape.iter().product(), 0.0);
        Ok(x)
    };
    let params = infos
        .iter()
        .map(|i| read(&i.name, &i.shape))
        .collect::<Result<Vec<_>, _>>()?;
    let moments = if st.names().iter().any(|n| n.starts_with("opt.m.")) {
        let m = infos
            .iter()
            .map(|i| read(&format!("opt.m.{}", i.name), &i.shape))
            .collect::<Result<Vec<_>, _>>()?;
        let v = infos
            .iter()
            .map(|i| read(&format!("opt.v.{}", i.name), &i.shape))
            .collect::<Result<Vec<_>, _>>()?;
        Some((m, v))
    } else {
        None
    };
    if crc.finalize() as u64 != want_crc {
        return Err(corrupt(
            "tensor data checksum mismatch (bit rot or a partial write)".into(),
        ));
    }
    Ok(Checkpoint {
        config,
        step,
        skipped_steps,
        params,
        moments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt() -> Checkpoint {
        let mut config = Config::preset("tiny").unwrap();
        for (k, v) in [
            ("model.width", "8"),
            ("model.layers", "1"),
            ("model.heads", "2"),
            ("model.head_dim", "4"),
        ] {
            config.set(k, v).unwrap();
        }
        let params: Vec<Vec<f32>> = layout(&config)
            .iter()
            .enumerate()
            .map(|(i, p)| vec![i as f32 * 0.5; p.numel()])
            .collect();
        let m = params
            .iter()
            .map(|p| p.iter().map(|x| x + 1.0).collect())
            .collect();
        Checkpoint {
            config,
            step: 42,
            skipped_steps: 1,
            moments: Some((m, params.clone())),
            params,
        }
    }

    /// The parameters as `save` names them, with each tensor's own length as its shape's rows.
    fn named_of(config: &Config, params: &[Vec<f32>]) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        layout(config)
            .iter()
            .zip(params)
            .map(|(i, p)| {
                let mut shape = i.shape.clone();
                shape[0] = p.len() / shape[1..].iter().product::<usize>();
                (i.name.clone(), shape, bytes(p))
            })
            .collect()
    }

    #[test]
    fn fused_projection_saved_before_its_padding_loads_with_zero_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.safetensors");
        let mut c = ckpt();
        c.config.set("model.gate", "data").unwrap();
        c.config.set("model.rotary", "fixed").unwrap();
        c.moments = None;
        let dims = crate::model::Dims::new(&c.config);
        assert!(dims.qkv_pad > 0, "this config's projection is padded");
        let pad = dims.qkv_pad;
        let params: Vec<Vec<f32>> = layout(&c.config)
            .iter()
            .enumerate()
            .map(|(i, p)| vec![1.0 + i as f32; p.numel()])
            .collect();
        // the file as written before the padding: the qkv tensors `pad` rows short
        let old: Vec<Vec<f32>> = layout(&c.config)
            .iter()
            .zip(&params)
            .map(
                |(i, p)| match i.name.ends_with(".qkv.weight") || i.name.ends_with(".qkv.bias") {
                    true => p[..p.len() - pad * i.shape[1..].iter().product::<usize>()].to_vec(),
                    false => p.clone(),
                },
            )
            .collect();
        save_named(&path, &c, &named_of(&c.config, &old)).unwrap();
        let loaded = load(&path).unwrap();
        for ((i, got), old) in layout(&c.config).iter().zip(&loaded.params).zip(&old) {
            assert_eq!(got.len(), i.numel(), "{}", i.name);
            assert_eq!(&got[..old.len()], &old[..], "{}", i.name);
            assert!(got[old.len()..].iter().all(|x| *x == 0.0), "{}", i.name);
        }
    }

    #[test]
    fn round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let c = ckpt();
        save(&path, &c).unwrap();
        assert_eq!(load(&path).unwrap(), c);
        let good = std::fs::read(&path).unwrap();
        // flip one bit in the tensor data (the end of the file) and in the header
        for at in [good.len() - 3, 20] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            std::fs::write(&path, &b).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains("c.safetensors") && e.contains("corrupt"), "{e}");
        }
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("corrupt"));
        // a wrong shape is corrupt too, however close
        let mut c2 = c.clone();
        c2.config.set("model.width", "16").unwrap();
        let named = named_of(&c2.config, &c.params);
        save_named(&path, &c2, &named).unwrap();
        assert!(load(&path)
            .unwrap_err()
            .to_string()
            .contains("the config needs"));
        assert!(matches!(
            load(&dir.path().join("none")),
            Err(CheckpointError::Missing(_))
        ));
    }
}
