//! Reading and writing `.npy` files for the CLI and tests.
//!
//! q, k, v, out and lse are float32; buffers are read in their declared
//! element type (int buffers from int32 or int64 files, float from float32,
//! bool from bool).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use ndarray::{Array, ArrayD, Dimension, Ix4};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

use crate::buffer::BufferData;
use crate::driver::Error;
use crate::sema::Type;

fn open(path: &Path) -> Result<BufReader<File>, Error> {
    File::open(path).map(BufReader::new).map_err(|e| Error::Io {
        what: format!("cannot read `{}`", path.display()),
        reason: e.to_string(),
    })
}

fn read_as<T: ndarray_npy::ReadableElement>(path: &Path) -> Result<ArrayD<T>, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    ArrayD::<T>::read_npy(BufReader::new(f)).map_err(|e| plain_reason(&e.to_string()))
}

/// Says in words what the common `.npy` read errors mean: the element type a
/// file holds (from its descriptor, e.g. `'<f8'`), or that it is not `.npy`.
fn plain_reason(reason: &str) -> String {
    if reason.contains("does not match magic string") {
        return "not an .npy file (it does not start with the .npy magic string)".to_string();
    }
    let descr = reason
        .strip_prefix("incorrect descriptor (")
        .and_then(|r| r.split(')').next())
        .map(|d| d.trim_matches(|c| c == '\'' || c == '"'));
    let Some(descr) = descr else {
        return reason.to_string();
    };
    let kind = match descr.trim_start_matches(['<', '>', '|', '=']) {
        "f2" => "float16",
        "f4" => "float32",
        "f8" => "float64",
        "i1" => "int8",
        "i2" => "int16",
        "i4" => "int32",
        "i8" => "int64",
        "u1" => "uint8",
        "u2" => "uint16",
        "u4" => "uint32",
        "u8" => "uint64",
        "b1" => "bool",
        _ => return format!("the file holds data of type `{descr}`"),
    };
    let order = if descr.starts_with('>') {
        ", big-endian"
    } else {
        ""
    };
    format!("the file holds {kind} data (descriptor `{descr}`{order})")
}

/// Reads a 4-D float32 array (q, k or v).
pub fn read_f32_4d(path: &Path, what: &str) -> Result<Array<f32, Ix4>, Error> {
    open(path)?;
    let a = read_as::<f32>(path).map_err(|reason| Error::Io {
        what: format!(
            "cannot read {what} from `{}` (expected a float32 .npy)",
            path.display()
        ),
        reason,
    })?;
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix4>().map_err(|_| Error::Io {
        what: format!("{what} in `{}` has shape {shape:?}", path.display()),
        reason: format!(
            "{what} must be 4-dimensional: {}",
            if what == "q" {
                "[B, H, Q, D]"
            } else {
                "[B, HKV, KV, D]"
            }
        ),
    })
}

/// Reads a buffer in its declared element type.
pub fn read_buffer(path: &Path, name: &str, ty: Type) -> Result<BufferData, Error> {
    open(path)?;
    let wrong = |reason: String| Error::Io {
        what: format!(
            "cannot read buffer `{name}` from `{}`: it is declared {ty}, which takes {}",
            path.display(),
            match ty {
                Type::Int => "int32 or int64 data",
                Type::Float => "float32 data",
                Type::Bool => "bool data",
            }
        ),
        reason,
    };
    Ok(match ty {
        Type::Int => match read_as::<i64>(path) {
            Ok(a) => BufferData::Int(a),
            Err(_) => BufferData::Int(read_as::<i32>(path).map_err(wrong)?.mapv(i64::from)),
        },
        Type::Float => BufferData::Float(read_as::<f32>(path).map_err(wrong)?),
        Type::Bool => BufferData::Bool(read_as::<bool>(path).map_err(wrong)?),
    })
}

/// Writes a float32 array.
pub fn write_f32<D: Dimension>(path: &Path, a: &Array<f32, D>) -> Result<(), Error> {
    let io = |reason: String| Error::Io {
        what: format!("cannot write `{}`", path.display()),
        reason,
    };
    let f = File::create(path).map_err(|e| io(e.to_string()))?;
    a.write_npy(std::io::BufWriter::new(f))
        .map_err(|e| io(e.to_string()))
}

/// Reads any float32 array (for tests and tools).
pub fn read_f32_dyn(path: &Path) -> Result<ArrayD<f32>, Error> {
    read_as::<f32>(path).map_err(|reason| Error::Io {
        what: format!("cannot read `{}`", path.display()),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_errors_name_the_element_type_found() {
        assert_eq!(
            plain_reason("incorrect descriptor ('<f8') for this type"),
            "the file holds float64 data (descriptor `<f8`)"
        );
        assert_eq!(
            plain_reason("incorrect descriptor ('|b1') for this type"),
            "the file holds bool data (descriptor `|b1`)"
        );
        assert!(
            plain_reason("error parsing header: start does not match magic string")
                .starts_with("not an .npy file")
        );
        assert_eq!(plain_reason("some other error"), "some other error");
    }
}
