//! Run-time buffer data, shared by every stage that sees concrete inputs
//! (the block-map analysis, the reference interpreter and the backends).

use ndarray::{ArrayD, IxDyn};

use crate::sema::{Type, Value};

/// The data of one named buffer, in its declared element type.
#[derive(Clone, Debug, PartialEq)]
pub enum BufferData {
    Int(ArrayD<i64>),
    Float(ArrayD<f32>),
    Bool(ArrayD<bool>),
}

impl BufferData {
    pub fn ty(&self) -> Type {
        match self {
            BufferData::Int(_) => Type::Int,
            BufferData::Float(_) => Type::Float,
            BufferData::Bool(_) => Type::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            BufferData::Int(a) => a.shape(),
            BufferData::Float(a) => a.shape(),
            BufferData::Bool(a) => a.shape(),
        }
    }

    /// Whether two buffers hold the same elements bit for bit: `-0.0` and
    /// `0.0` differ (a mask may tell them apart: `1.0 / x > 0.0`), and a NaN
    /// equals itself (the derived `==` says a buffer holding one differs
    /// from itself).
    pub fn same_bits(&self, other: &BufferData) -> bool {
        self.shape() == other.shape()
            && match (self, other) {
                (BufferData::Int(x), BufferData::Int(y)) => x.iter().eq(y.iter()),
                (BufferData::Bool(x), BufferData::Bool(y)) => x.iter().eq(y.iter()),
                (BufferData::Float(x), BufferData::Float(y)) => x
                    .iter()
                    .zip(y.iter())
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                _ => false,
            }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the elements in memory.
    pub fn size_bytes(&self) -> usize {
        self.len()
            * match self {
                BufferData::Int(_) => 8,
                BufferData::Float(_) => 4,
                BufferData::Bool(_) => 1,
            }
    }

    /// The element at a (possibly out-of-range or negative) index.
    pub fn get(&self, index: &[i64]) -> Option<Value> {
        let shape = self.shape();
        if index.len() != shape.len() {
            return None;
        }
        let mut idx = Vec::with_capacity(index.len());
        for (&i, &n) in index.iter().zip(shape) {
            if i < 0 || i as u64 >= n as u64 {
                return None;
            }
            idx.push(i as usize);
        }
        let idx = IxDyn(&idx);
        Some(match self {
            BufferData::Int(a) => Value::Int(a[idx]),
            BufferData::Float(a) => Value::Float(f64::from(a[idx])),
            BufferData::Bool(a) => Value::Bool(a[idx]),
        })
    }
}
