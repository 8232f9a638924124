//! Checkpoint weights: safetensors shards viewed in place.
//!
//! The header parser is our own (about a hundred lines) rather than `safetensors::read_metadata`:
//! that one reports a size mismatch without naming the tensor and cannot tell a truncated
//! file from a header whose offsets are wrong, and a user loading a 16 GB download needs to
//! know which of the two happened. Tensor data is never copied unless a tensor's offset is
//! not aligned to its element size (then it is copied once, at load).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use dvl_kernels::packed::PackedBf16;
use half::{bf16, f16};

use crate::error::{Error, Result};

/// Element types the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

/// Bytes of one shard. Anything that can lend a byte slice: a memory map, a `Vec<u8>`, or a
/// caller's buffer (`&'a [u8]`, the no_std and "load from memory" path).
pub type ShardBytes<'a> = Box<dyn AsRef<[u8]> + Send + Sync + 'a>;

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
    /// Set only when the stored bytes are misaligned for the element type.
    owned: Option<OwnedData>,
}

#[derive(Clone, Debug)]
enum OwnedData {
    U16(Vec<u16>),
    F32(Vec<f32>),
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor's elements, borrowed from the checkpoint, or a bf16 matrix repacked at load
/// into 16-output panels for the AVX2 kernels ([`dvl_kernels::packed`]).
#[derive(Clone, Copy)]
pub enum WData<'a> {
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    F32(&'a [f32]),
    Packed(&'a PackedBf16),
}

impl WData<'_> {
    pub fn len(&self) -> usize {
        match self {
            WData::BF16(s) => s.len(),
            WData::F16(s) => s.len(),
            WData::F32(s) => s.len(),
            WData::Packed(p) => p.n() * p.k(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widen elements `[start, start + out.len())` to f32.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        use dvl_kernels::WeightElem;
        let n = out.len();
        match self {
            WData::BF16(s) => out
                .iter_mut()
                .zip(&s[start..start + n])
                .for_each(|(o, v)| *o = v.to_f32()),
            WData::F16(s) => out
                .iter_mut()
                .zip(&s[start..start + n])
                .for_each(|(o, v)| *o = WeightElem::to_f32(*v)),
            WData::F32(s) => out.copy_from_slice(&s[start..start + n]),
            WData::Packed(p) => {
                assert!(start + n <= self.len(), "read_f32: past the matrix");
                // Row by row: W[j][kk] for element j·k + kk.
                let k = p.k().max(1);
                let mut done = 0;
                while done < n {
                    let (j, kk) = ((start + done) / k, (start + done) % k);
                    let len = (k - kk).min(n - done);
                    p.read_row(j, kk, &mut out[done..done + len]);
                    done += len;
                }
            }
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = alloc::vec![0f32; self.len()];
        self.read_f32(0, &mut v);
        v
    }
}

/// All shards of a checkpoint plus the index of every tensor in them.
pub struct WeightStore<'a> {
    shards: Vec<ShardBytes<'a>>,
    shard_names: Vec<String>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl<'a> WeightStore<'a> {
    /// Parse every shard's header. `shards` pairs a display name (file name) with its bytes.
    pub fn new(shards: Vec<(String, ShardBytes<'a>)>) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        let mut names = Vec::new();
        let mut bytes = Vec::new();
        for (idx, (name, data)) in shards.into_iter().enumerate() {
            for t in parse_header(&name, (*data).as_ref(), idx)? {
                if tensors.contains_key(&t.name) {
                    return Err(Error::Index(format!(
                        "tensor {} appears in more than one shard",
                        t.name
                    )));
                }
                tensors.insert(t.name.clone(), t);
            }
            names.push(name);
            bytes.push(data);
        }
        let mut store = WeightStore {
            shards: bytes,
            shard_names: names,
            tensors,
        };
        store.fix_alignment();
        Ok(store)
    }

    fn fix_alignment(&mut self) {
        for t in self.tensors.values_mut() {
            let b = &(*self.shards[t.shard]).as_ref()[t.start..t.end];
            let misaligned = !(b.as_ptr() as usize).is_multiple_of(t.dtype.size());
            if misaligned {
                t.owned = Some(match t.dtype {
                    DType::F32 => OwnedData::F32(
                        b.chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    ),
                    _ => OwnedData::U16(
                        b.chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .collect(),
                    ),
                });
            }
        }
    }

    pub fn shard_names(&self) -> &[String] {
        &self.shard_names
    }

    /// Reads one byte of every 4 KiB page of every shard, so that mapped weights are in
    /// memory before something is timed (a first pass over a 7 GB checkpoint that is not
    /// in the page cache measures the disk). Returns their sum, for the caller to keep.
    pub fn touch_pages(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                (**s)
                    .as_ref()
                    .iter()
                    .step_by(4096)
                    .map(|&b| b as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Total bytes of the named tensors.
    pub fn bytes_of<'s>(&self, names: impl Iterator<Item = &'s str>) -> u64 {
        names
            .filter_map(|n| self.tensors.get(n))
            .map(|t| (t.end - t.start) as u64)
            .sum()
    }

    /// Look a tensor up and check its shape; the error names the tensor.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
        })?;
        if t.shape != shape {
            return Err(Error::WrongShape {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Borrow a tensor's elements.
    pub fn data<'s>(&'s self, t: &'s TensorInfo) -> WData<'s> {
        match &t.owned {
            Some(OwnedData::F32(v)) => return WData::F32(v),
            Some(OwnedData::U16(v)) => {
                let v: &[u16] = v;
                return match t.dtype {
                    DType::BF16 => WData::BF16(bytemuck::cast_slice(v)),
                    _ => WData::F16(bytemuck::cast_slice(v)),
                };
            }
            None => {}
        }
        let b = &(*self.shards[t.shard]).as_ref()[t.start..t.end];
        // Alignment was checked at load (fix_alignment), so these casts cannot fail.
        match t.dtype {
            DType::BF16 => WData::BF16(bytemuck::cast_slice(b)),
            DType::F16 => WData::F16(bytemuck::cast_slice(b)),
            DType::F32 => WData::F32(bytemuck::cast_slice(b)),
        }
    }

    /// A small tensor (norm weight, bias) widened to an owned f32 vector, shape-checked.
    pub fn f32_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.expect(name, shape)?;
        Ok(self.data(t).to_f32_vec())
    }
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parse and validate one safetensors header: 8-byte little-endian length, JSON object of
/// `name → {dtype, shape, data_offsets}` (plus optional `__metadata__`), then the data.
fn parse_header(file: &str, bytes: &[u8], shard: usize) -> Result<Vec<TensorInfo>> {
    let len = bytes.len() as u64;
    if len < 8 {
        return Err(Error::Truncated {
            file: file.to_string(),
            needed: 8,
            actual: len,
        });
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > 100 << 20 {
        return Err(Error::BadHeader {
            file: file.to_string(),
            detail: format!("header length {n} exceeds 100 MiB"),
        });
    }
    if 8 + n > len {
        return Err(Error::Truncated {
            file: file.to_string(),
            needed: 8 + n,
            actual: len,
        });
    }
    let header = &bytes[8..8 + n as usize];
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| Error::BadHeader {
            file: file.to_string(),
            detail: format!("invalid JSON: {e}"),
        })?;
    let data_len = len - 8 - n;
    let mut out = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: RawEntry = serde_json::from_value(value).map_err(|e| Error::BadHeader {
            file: file.to_string(),
            detail: format!("entry {name}: {e}"),
        })?;
        let dtype = match e.dtype.as_str() {
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            "F32" => DType::F32,
            other => {
                return Err(Error::WrongDtype {
                    tensor: name,
                    found: other.to_string(),
                })
            }
        };
        let numel = e.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let nbytes = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
        let [s, t] = e.data_offsets;
        let bad = |detail: String| Error::BadOffsets {
            file: file.to_string(),
            tensor: name.clone(),
            detail,
        };
        let nbytes = nbytes.ok_or_else(|| bad(format!("shape {:?} overflows", e.shape)))?;
        if t < s {
            return Err(bad(format!("end {t} < start {s}")));
        }
        if t - s != nbytes {
            return Err(bad(format!(
                "[{s}, {t}) is {} bytes but {:?} {:?} needs {nbytes}",
                t - s,
                e.dtype,
                e.shape
            )));
        }
        out.push((s, t, name, dtype, e.shape));
    }
    // Tensors must tile the data region without overlap; check after sorting by offset.
    out.sort_by_key(|x| (x.0, x.1));
    let mut prev_end = 0u64;
    let mut prev_name = String::new();
    for (s, t, name, _, _) in &out {
        if *s < prev_end {
            return Err(Error::BadOffsets {
                file: file.to_string(),
                tensor: name.clone(),
                detail: format!("starts at {s}, inside {prev_name} (ends at {prev_end})"),
            });
        }
        prev_end = *t;
        prev_name = name.clone();
    }
    let needed = out.last().map_or(0, |x| x.1);
    if needed > data_len {
        return Err(Error::Truncated {
            file: file.to_string(),
            needed: 8 + n + needed,
            actual: len,
        });
    }
    let base = 8 + n as usize;
    Ok(out
        .into_iter()
        .map(|(s, t, name, dtype, shape)| TensorInfo {
            name,
            dtype,
            shape: shape.into_iter().map(|d| d as usize).collect(),
            shard,
            start: base + s as usize,
            end: base + t as usize,
            owned: None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a safetensors file from (name, dtype, shape, data_offsets) and a data length.
    fn file(entries: &[(&str, &str, &[u64], [u64; 2])], data_len: usize) -> Vec<u8> {
        let mut h = String::from("{");
        for (i, (n, d, s, o)) in entries.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h += &format!(
                "\"{n}\":{{\"dtype\":\"{d}\",\"shape\":{s:?},\"data_offsets\":[{},{}]}}",
                o[0], o[1]
            );
        }
        h.push('}');
        while h.len() % 8 != 0 {
            h.push(' ');
        }
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend(core::iter::repeat_n(0u8, data_len));
        b
    }

    fn store(b: Vec<u8>) -> Result<WeightStore<'static>> {
        WeightStore::new(alloc::vec![(
            "t.safetensors".to_string(),
            Box::new(b) as ShardBytes
        )])
    }

    #[test]
    fn touching_pages_reads_one_byte_per_page() {
        let mut b = file(&[("a", "BF16", &[4500], [0, 9000])], 9000);
        let header = b.len() - 9000;
        for (i, v) in b.iter_mut().enumerate().skip(header) {
            *v = (i % 251) as u8 + 1;
        }
        let want: u64 = (0..b.len())
            .filter(|i| i % 4096 == 0)
            .map(|i| b[i] as u64)
            .sum();
        assert!(want > b[0] as u64, "the data spans more than one page");
        assert_eq!(store(b).unwrap().touch_pages(), want);
    }

    #[test]
    fn good_file_views_in_place() {
        let s = store(file(
            &[
                ("a", "F32", &[2, 2], [0, 16]),
                ("b", "BF16", &[3], [16, 22]),
            ],
            22,
        ))
        .unwrap();
        let a = s.expect("a", &[2, 2]).unwrap();
        assert_eq!(s.data(a).len(), 4);
        assert_eq!(s.data(s.info("b").unwrap()).len(), 3);
    }

    #[test]
    fn truncated_data_is_reported_as_truncation() {
        let e = store(file(&[("a", "F32", &[2, 2], [0, 16])], 10))
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                Error::Truncated {
                    needed: _,
                    actual: _,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("truncated"));
    }

    #[test]
    fn truncated_header_is_reported_as_truncation() {
        let mut b = file(&[("a", "F32", &[2, 2], [0, 16])], 16);
        b.truncate(20);
        assert!(matches!(store(b), Err(Error::Truncated { .. })));
        assert!(matches!(
            store(alloc::vec![1, 2, 3]),
            Err(Error::Truncated { needed: 8, .. })
        ));
    }

    #[test]
    fn offsets_overrunning_are_named() {
        let e = store(file(&[("w", "F32", &[2, 2], [0, 1 << 40])], 16))
            .err()
            .unwrap();
        match &e {
            Error::BadOffsets { tensor, .. } => assert_eq!(tensor, "w"),
            other => panic!("{other}"),
        }
        let e = store(file(
            &[("a", "F32", &[2], [0, 8]), ("b", "F32", &[2], [4, 12])],
            16,
        ))
        .err()
        .unwrap();
        assert!(
            matches!(e, Error::BadOffsets { ref tensor, .. } if tensor == "b"),
            "{e}"
        );
    }

    #[test]
    fn wrong_dtype_and_shape_are_named() {
        let e = store(file(&[("q", "I64", &[2], [0, 16])], 16))
            .err()
            .unwrap();
        assert!(
            matches!(e, Error::WrongDtype { ref tensor, .. } if tensor == "q"),
            "{e}"
        );
        let s = store(file(&[("a", "F32", &[2, 2], [0, 16])], 16)).unwrap();
        let e = s.expect("a", &[4]).err().unwrap();
        assert!(matches!(e, Error::WrongShape { .. }));
        assert!(matches!(
            s.expect("nope", &[1]),
            Err(Error::MissingTensor { .. })
        ));
    }

    #[test]
    fn bad_json_is_a_header_error() {
        let mut b = 4u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{oops");
        assert!(matches!(store(b), Err(Error::BadHeader { .. })));
    }

    #[test]
    fn misaligned_tensor_is_copied_once() {
        // Header length 8k + 1 -> data starts at an odd address relative to the buffer.
        let mut h =
            String::from("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}");
        while h.len() % 8 != 1 {
            h.push(' ');
        }
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&[0x80, 0x3f, 0x00, 0x40]); // 1.0, 2.0 in bf16
        let s = store(b).unwrap();
        let v = s.data(s.info("a").unwrap()).to_f32_vec();
        assert_eq!(v, alloc::vec![1.0, 2.0]);
    }

    #[test]
    fn panels_read_back_as_the_stored_elements() {
        // Reads that start inside one output's row and run into the next ones.
        let (n, k) = (19, 5);
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(i as f32 - 40.0))
            .collect();
        let p = PackedBf16::new(&w, n, k);
        let (stored, panels) = (WData::BF16(&w), WData::Packed(&p));
        assert_eq!(panels.len(), stored.len());
        assert_eq!(panels.to_f32_vec(), stored.to_f32_vec());
        for (start, len) in [(0, 1), (3, 9), (k * 17 + 2, 8)] {
            let (mut a, mut b) = (alloc::vec![0f32; len], alloc::vec![1f32; len]);
            stored.read_f32(start, &mut a);
            panels.read_f32(start, &mut b);
            assert_eq!(a, b, "{start}+{len}");
        }
    }
}
