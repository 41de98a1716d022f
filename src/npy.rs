//! Reading and writing `.npy` files for the CLI and tests.
//!
//! q, k, v, out and lse are float32; buffers are read in their declared
//! element type (int buffers from int32 or int64 files, float from float32,
//! bool from bool).

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::Path;

use ndarray::{Array, ArrayD, Dimension, Ix4};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

use crate::buffer::BufferData;
use crate::driver::Error;
use crate::memory::{self, Estimate};
use crate::sema::Type;

/// The longest `.npy` header read (numpy itself writes a few hundred bytes).
const MAX_HEADER_BYTES: usize = 1 << 20;

/// What the header of an `.npy` file says, as far as the checks before
/// reading need it.
#[derive(Clone, Debug, PartialEq)]
struct Header {
    /// The descriptor, such as `<f4`.
    descr: String,
    shape: Vec<usize>,
}

impl Header {
    /// Bytes per element, from the descriptor's size (`<f4` → 4).
    fn item_bytes(&self) -> Option<usize> {
        let digits = self.descr.trim_start_matches(['<', '>', '|', '=']);
        digits.get(1..)?.parse().ok()
    }

    fn elements(&self) -> u128 {
        memory::array_bytes(&self.shape, 1)
    }

    fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|n| n.to_string()).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// An open `.npy` file: a reader from its first byte, its header where it
/// could be parsed (otherwise the `.npy` reader reports what is wrong), and
/// the bytes that follow the header in a regular file.
struct Opened {
    reader: std::io::Chain<Cursor<Vec<u8>>, BufReader<File>>,
    header: Option<Header>,
    data_bytes: Option<u64>,
}

/// The value of `'key':` in the header dict (a quoted string, a tuple or a word).
fn dict_value<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    let at = dict
        .find(&format!("'{key}'"))
        .or_else(|| dict.find(&format!("\"{key}\"")))?;
    let rest = dict[at + key.len() + 2..].trim_start().strip_prefix(':')?;
    let rest = rest.trim_start();
    let end = match rest.chars().next()? {
        '(' => rest.find(')')? + 1,
        q @ ('\'' | '"') => rest[1..].find(q)? + 2,
        _ => rest.find([',', '}'])?,
    };
    Some(rest[..end].trim())
}

fn parse_header(dict: &str) -> Option<Header> {
    let descr = dict_value(dict, "descr")?;
    let descr = descr
        .strip_prefix(['\'', '"'])?
        .strip_suffix(['\'', '"'])?
        .to_string();
    let shape = dict_value(dict, "shape")?
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse::<usize>().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some(Header { descr, shape })
}

/// Opens an `.npy` file and reads its header, without reading its data.
fn open_npy(path: &Path) -> Result<Opened, Error> {
    let io = |reason: String| Error::Io {
        what: format!("cannot read `{}`", path.display()),
        reason,
    };
    let file = File::open(path).map_err(|e| io(e.to_string()))?;
    let meta = file.metadata().map_err(|e| io(e.to_string()))?;
    if meta.is_dir() {
        return Err(io("it is a directory, not an .npy file".into()));
    }
    let mut reader = BufReader::new(file);
    let mut prefix = Vec::new();
    let take = |reader: &mut BufReader<File>, prefix: &mut Vec<u8>, n: usize| {
        let start = prefix.len();
        reader
            .by_ref()
            .take(n as u64)
            .read_to_end(prefix)
            .map_err(|e| io(e.to_string()))
            .map(|got| got == n && prefix.len() == start + n)
    };
    let mut header = None;
    // The magic string, the version and the header's length (2 bytes in
    // version 1, 4 in versions 2 and 3), then the header dict.
    if take(&mut reader, &mut prefix, 10)? && prefix.starts_with(b"\x93NUMPY") {
        let version = prefix[6];
        let len = match version {
            1 => Some(u16::from_le_bytes([prefix[8], prefix[9]]) as usize),
            2 | 3 if take(&mut reader, &mut prefix, 2)? => {
                Some(u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize)
            }
            _ => None,
        };
        if let Some(len) = len {
            if len > MAX_HEADER_BYTES {
                return Err(io(format!(
                    "its header claims to be {} long; .npy headers are at most {}",
                    memory::bytes(len as u128),
                    memory::bytes(MAX_HEADER_BYTES as u128)
                )));
            }
            let start = prefix.len();
            if take(&mut reader, &mut prefix, len)? {
                header = std::str::from_utf8(&prefix[start..])
                    .ok()
                    .and_then(parse_header);
            }
        }
    }
    let data_bytes = meta
        .is_file()
        .then(|| meta.len().saturating_sub(prefix.len() as u64));
    Ok(Opened {
        reader: Cursor::new(prefix).chain(reader),
        header,
        data_bytes,
    })
}

/// Checks, before reading, that the data the header of `opened` claims is
/// in the file and that reading it into elements of `elem` bytes (plus
/// `extra` bytes per element for a conversion) fits in memory.
fn check_claim(
    opened: &Opened,
    path: &Path,
    what: &str,
    elem: usize,
    extra: usize,
) -> Result<(), Error> {
    let Some(header) = &opened.header else {
        return Ok(());
    };
    let Some(item) = header.item_bytes() else {
        return Ok(());
    };
    let claimed = header.elements().saturating_mul(item as u128);
    if let Some(present) = opened.data_bytes {
        if claimed > present as u128 {
            return Err(Error::Io {
                what: format!("cannot read {what} from `{}`", path.display()),
                reason: format!(
                    "its header claims shape {} of `{}`, {} of data, but the file holds only {} after the header",
                    header.shape_text(),
                    header.descr,
                    memory::bytes(claimed),
                    memory::bytes(present as u128),
                ),
            });
        }
    }
    let mut e = Estimate::new();
    e.array(what, &header.shape, elem);
    if extra > 0 {
        e.add(
            "its conversion",
            header.elements().saturating_mul(extra as u128),
        );
    }
    e.check(format_args!(
        "reading {what} of shape {} from `{}`",
        header.shape_text(),
        path.display()
    ))?;
    Ok(())
}

fn read_as<T: ndarray_npy::ReadableElement>(opened: Opened) -> Result<ArrayD<T>, String> {
    ArrayD::<T>::read_npy(opened.reader).map_err(|e| plain_reason(&e.to_string()))
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
    let opened = open_npy(path)?;
    check_claim(&opened, path, what, 4, 0)?;
    let a = read_as::<f32>(opened).map_err(|reason| Error::Io {
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
    let opened = open_npy(path)?;
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
    let what = format!("buffer `{name}`");
    let int32 = opened
        .header
        .as_ref()
        .is_some_and(|h| h.descr.trim_start_matches(['<', '>', '|', '=']) == "i4");
    Ok(match ty {
        Type::Int if int32 => {
            check_claim(&opened, path, &what, 4, 8)?;
            BufferData::Int(read_as::<i32>(opened).map_err(wrong)?.mapv(i64::from))
        }
        Type::Int => {
            check_claim(&opened, path, &what, 8, 0)?;
            BufferData::Int(read_as::<i64>(opened).map_err(wrong)?)
        }
        Type::Float => {
            check_claim(&opened, path, &what, 4, 0)?;
            BufferData::Float(read_as::<f32>(opened).map_err(wrong)?)
        }
        Type::Bool => {
            check_claim(&opened, path, &what, 1, 0)?;
            BufferData::Bool(read_as::<bool>(opened).map_err(wrong)?)
        }
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
    let opened = open_npy(path)?;
    check_claim(&opened, path, "an array", 4, 0)?;
    read_as::<f32>(opened).map_err(|reason| Error::Io {
        what: format!("cannot read `{}`", path.display()),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_read_as_numpy_writes_them() {
        let h = parse_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2147483648, 16), }   \n",
        )
        .unwrap();
        assert_eq!(h.descr, "<f4");
        assert_eq!(h.shape, vec![1, 1, 1 << 31, 16]);
        assert_eq!(h.item_bytes(), Some(4));
        assert_eq!(h.shape_text(), "[1, 1, 2147483648, 16]");
        let h = parse_header("{'descr': '|b1', 'fortran_order': False, 'shape': (7,), }").unwrap();
        assert_eq!((h.shape.clone(), h.item_bytes()), (vec![7], Some(1)));
        let h = parse_header("{'shape': (), 'descr': '<i8', 'fortran_order': False}").unwrap();
        assert_eq!(
            (h.shape.clone(), h.item_bytes(), h.elements()),
            (vec![], Some(8), 1)
        );
        // Shapes too large for usize, structured types: left to the reader.
        assert_eq!(
            parse_header("{'descr': '<f4', 'shape': (99999999999999999999999,), }"),
            None
        );
        assert_eq!(
            parse_header("{'descr': [('a', '<f4')], 'shape': (2,), }").and_then(|h| h.item_bytes()),
            None
        );
    }

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
