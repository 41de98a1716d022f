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

/// The bytes of a version-1 `.npy` file with `header` (the dict literal,
/// written as given and padded as numpy pads it) and `data`, unchecked: for
/// tests and fuzzing that craft files the writer never makes (a header that
/// claims more data than follows, a shape no array can hold).
pub fn v1_file_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut dict = header.to_string();
    // Magic (6), version (2), length (2), dict and newline: a multiple of 64.
    while !(10 + dict.len() + 1).is_multiple_of(64) {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

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

/// A tuple or list element, or a dict's key and value.
type Item = (Lit, Option<Lit>);

/// A Python literal of an `.npy` header, as far as attnc reads one.
#[derive(Clone, Debug, PartialEq)]
enum Lit {
    Str(String),
    /// An integer; `None` when it does not fit in a u128.
    Int(Option<u128>),
    Bool,
    None,
    Tuple(Vec<Lit>),
    List(Vec<Lit>),
    Dict(Vec<(Lit, Lit)>),
}

/// A parser of the Python literals numpy writes in `.npy` headers: strings
/// without escapes or prefixes, integers (decimal, `0x`, `0o`, `0b`, with
/// `_` and a sign), `True`, `False`, `None`, tuples, lists and dicts.
/// Anything else (floats, escapes, ...) is refused: the checks before
/// reading must understand every header the `.npy` reader would accept.
struct LitParser<'a> {
    text: &'a [u8],
    at: usize,
}

impl LitParser<'_> {
    fn skip_space(&mut self) {
        while self
            .text
            .get(self.at)
            .is_some_and(|c| c.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        let found = self.text.get(self.at) == Some(&c);
        if found {
            self.at += 1;
        }
        found
    }

    /// Items up to `close`, separated by commas, a trailing comma allowed.
    /// Returns the items and whether a comma was seen.
    fn items(&mut self, close: u8, pairs: bool) -> Option<(Vec<Item>, bool)> {
        let mut items = Vec::new();
        let mut comma = false;
        loop {
            if self.eat(close) {
                return Some((items, comma));
            }
            if !items.is_empty() && !comma {
                return None;
            }
            let key = self.value()?;
            let value = if pairs {
                if !self.eat(b':') {
                    return None;
                }
                Some(self.value()?)
            } else {
                None
            };
            items.push((key, value));
            comma = self.eat(b',');
            if !comma && !self.eat(close) {
                return None;
            }
            if !comma {
                return Some((items, false));
            }
        }
    }

    fn value(&mut self) -> Option<Lit> {
        self.skip_space();
        let c = *self.text.get(self.at)?;
        match c {
            b'\'' | b'"' => {
                let end = self.text[self.at + 1..].iter().position(|&x| x == c)?;
                let body = &self.text[self.at + 1..self.at + 1 + end];
                if body.contains(&b'\\') {
                    return None;
                }
                self.at += end + 2;
                Some(Lit::Str(std::str::from_utf8(body).ok()?.to_string()))
            }
            b'(' => {
                self.at += 1;
                let (items, comma) = self.items(b')', false)?;
                let mut items: Vec<Lit> = items.into_iter().map(|(v, _)| v).collect();
                // `(x)` is x; `(x,)` and `()` are tuples.
                Some(if items.len() == 1 && !comma {
                    items.pop()?
                } else {
                    Lit::Tuple(items)
                })
            }
            b'[' => {
                self.at += 1;
                let (items, _) = self.items(b']', false)?;
                Some(Lit::List(items.into_iter().map(|(v, _)| v).collect()))
            }
            b'{' => {
                self.at += 1;
                let (items, _) = self.items(b'}', true)?;
                Some(Lit::Dict(
                    items
                        .into_iter()
                        .map(|(k, v)| Some((k, v?)))
                        .collect::<Option<_>>()?,
                ))
            }
            b'+' | b'-' | b'0'..=b'9' => self.int(),
            _ => {
                let rest = &self.text[self.at..];
                let word_len = rest
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .unwrap_or(rest.len());
                let lit = match &rest[..word_len] {
                    b"True" | b"False" => Lit::Bool,
                    b"None" => Lit::None,
                    _ => return None,
                };
                self.at += word_len;
                Some(lit)
            }
        }
    }

    fn int(&mut self) -> Option<Lit> {
        let mut negative = false;
        while let Some(&c @ (b'+' | b'-')) = self.text.get(self.at) {
            negative ^= c == b'-';
            self.at += 1;
            self.skip_space();
        }
        let rest = &self.text[self.at..];
        let len = rest
            .iter()
            .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
            .unwrap_or(rest.len());
        let word = std::str::from_utf8(&rest[..len]).ok()?;
        self.at += len;
        let (digits, radix) = match word.get(..2).map(str::to_ascii_lowercase).as_deref() {
            Some("0x") => (&word[2..], 16),
            Some("0o") => (&word[2..], 8),
            Some("0b") => (&word[2..], 2),
            _ => (word, 10),
        };
        if digits.is_empty()
            || digits.starts_with('_')
            || digits.ends_with('_')
            || digits.contains("__")
            || !digits.chars().all(|c| c == '_' || c.is_digit(radix))
        {
            return None;
        }
        let n = u128::from_str_radix(&digits.replace('_', ""), radix).ok();
        // A negative size is never a size; keep it apart from large ones.
        Some(Lit::Int(if negative && n != Some(0) {
            Some(u128::MAX)
        } else {
            n
        }))
    }
}

/// Parses the dict of an `.npy` header. `None` when it is not one attnc can
/// read (then the file is refused: see [`LitParser`]).
fn parse_header(dict: &str) -> Option<Header> {
    let mut p = LitParser {
        text: dict.as_bytes(),
        at: 0,
    };
    let Lit::Dict(pairs) = p.value()? else {
        return None;
    };
    p.skip_space();
    if p.at != dict.len() {
        return None;
    }
    // Python keeps the last value of a key given twice.
    let last = |key: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| *k == Lit::Str(key.to_string()))
            .map(|(_, v)| v)
    };
    let descr = match last("descr") {
        Some(Lit::Str(d)) => d.clone(),
        Some(_) => "(a structured type)".to_string(),
        None => "(none)".to_string(),
    };
    let Some(Lit::Tuple(dims)) = last("shape") else {
        return None;
    };
    let shape = dims
        .iter()
        .map(|d| match d {
            Lit::Int(Some(n)) => usize::try_from(*n).ok(),
            _ => None,
        })
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
                let text = std::str::from_utf8(&prefix[start..]).unwrap_or("");
                header = parse_header(text);
                if header.is_none() {
                    // The `.npy` reader might understand it and allocate what it
                    // claims before any check: refuse it.
                    return Err(io(format!(
                        "its header is not one attnc reads (a dict of `descr`, `fortran_order` and a `shape` of sizes, as numpy writes it): {:?}",
                        text.chars().take(200).collect::<String>()
                    )));
                }
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
    // A successful read of elements of `elem` bytes needs `elem` bytes of
    // data per element, and the reader allocates them before it looks at
    // the descriptor: the claim is checked in those elements. An array's shape must be addressable even where an axis is 0: the
    // product of its other axes must fit in an isize.
    let nonzero = header
        .shape
        .iter()
        .filter(|&&n| n > 0)
        .fold(elem as u128, |acc, &n| acc.saturating_mul(n as u128));
    if nonzero > isize::MAX as u128 {
        return Err(Error::Io {
            what: format!("cannot read {what} from `{}`", path.display()),
            reason: format!(
                "its header claims shape {}, which no array can hold (its axes multiply to more than 2^63 - 1 bytes)",
                header.shape_text()
            ),
        });
    }
    let claimed = header.elements().saturating_mul(elem as u128);
    if let Some(present) = opened.data_bytes {
        if claimed > present as u128 {
            return Err(Error::Io {
                what: format!("cannot read {what} from `{}`", path.display()),
                reason: format!(
                    "its header claims shape {} of `{}`: reading it needs {} of data, but the file holds only {} after the header",
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

/// Why reading elements whose descriptors are `accepted` must fail on this
/// file, found before reading (the reader would allocate its claim first).
fn wrong_descr(opened: &Opened, accepted: &[&str]) -> Option<String> {
    let h = opened.header.as_ref()?;
    (!accepted.contains(&h.descr.as_str())).then(|| {
        plain_reason(&format!(
            "incorrect descriptor ('{}') for this type",
            h.descr
        ))
    })
}

/// The descriptors the reader takes for float32, int32, int64 and bool.
const F32: [&str; 2] = ["<f4", ">f4"];
const F32_F64: [&str; 4] = ["<f4", ">f4", "<f8", ">f8"];
const I32: [&str; 2] = ["<i4", ">i4"];
const I64: [&str; 2] = ["<i8", ">i8"];
const BOOL: [&str; 1] = ["|b1"];

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
    let bare = descr.trim_start_matches(['<', '>', '|', '=']);
    let kind = match bare {
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
    let one_byte = matches!(bare, "i1" | "u1" | "b1");
    if !one_byte && !descr.starts_with(['<', '>']) {
        // `=f4`, `|f4` or `f4`: no byte order, which the reader needs.
        return format!(
            "the file holds {kind} data without an explicit byte order (descriptor `{descr}`), \
             which attnc does not read: save it as numpy does, `np.save(path, a.astype('<{bare}'))`"
        );
    }
    let order = if descr.starts_with('>') {
        ", big-endian"
    } else {
        ""
    };
    format!("the file holds {kind} data (descriptor `{descr}`{order})")
}

/// Whether the header of `opened` says float64 data.
fn holds_f64(opened: &Opened) -> bool {
    opened
        .header
        .as_ref()
        .is_some_and(|h| matches!(h.descr.as_str(), "<f8" | ">f8"))
}

/// Reads a 4-D float32 array (q, k or v).
pub fn read_f32_4d(path: &Path, what: &str) -> Result<Array<f32, Ix4>, Error> {
    read_4d(path, what, false).map(|(a, _)| a)
}

/// Reads a 4-D float array (q, k or v) as float32: float32 as it is,
/// float64 converted (rounded to nearest). The flag says whether the file
/// held float64 (so the caller can say it converted). Other element types
/// (ints, bools) are errors naming the type found.
pub fn read_float_4d(path: &Path, what: &str) -> Result<(Array<f32, Ix4>, bool), Error> {
    read_4d(path, what, true)
}

fn read_4d(path: &Path, what: &str, allow_f64: bool) -> Result<(Array<f32, Ix4>, bool), Error> {
    let opened = open_npy(path)?;
    let wrong = |reason: String| Error::Io {
        what: format!(
            "cannot read {what} from `{}` (expected a {} .npy)",
            path.display(),
            if allow_f64 {
                "float32 or float64"
            } else {
                "float32"
            }
        ),
        reason,
    };
    if let Some(reason) = wrong_descr(&opened, if allow_f64 { &F32_F64 } else { &F32 }) {
        return Err(wrong(reason));
    }
    let f64 = allow_f64 && holds_f64(&opened);
    let a = if f64 {
        check_claim(&opened, path, what, 8, 4)?;
        read_as::<f64>(opened).map_err(wrong)?.mapv(|x| x as f32)
    } else {
        check_claim(&opened, path, what, 4, 0)?;
        read_as::<f32>(opened).map_err(wrong)?
    };
    let shape = a.shape().to_vec();
    let a = a.into_dimensionality::<Ix4>().map_err(|_| Error::Io {
        what: format!("{what} in `{}` has shape {shape:?}", path.display()),
        reason: format!(
            "{what} must be 4-dimensional: {}",
            if what == "q" {
                "[B, H, Q, D]"
            } else {
                "[B, HKV, KV, D]"
            }
        ),
    })?;
    Ok((a, f64))
}

/// What a q, k or v file held, read in its own type.
enum Stored {
    F32(ArrayD<f32>),
    /// float64, converted to float32 (rounded to nearest).
    F64(ArrayD<f32>),
    F16(ArrayD<half::f16>),
    /// uint16: bf16 bit patterns (numpy has no bf16).
    U16(ArrayD<u16>),
    I8(ArrayD<i8>),
    /// uint8: fp8 e4m3fn bits.
    U8(ArrayD<u8>),
}

impl Stored {
    fn kind(&self) -> &'static str {
        match self {
            Stored::F32(_) => "float32",
            Stored::F64(_) => "float64",
            Stored::F16(_) => "float16",
            Stored::U16(_) => "uint16 (bf16 bits)",
            Stored::I8(_) => "int8",
            Stored::U8(_) => "uint8 (fp8 bits)",
        }
    }
}

/// The descriptors of the element types q, k and v may be stored in.
const STORED: [&str; 14] = [
    "<f4", ">f4", "<f8", ">f8", "<f2", ">f2", "<u2", ">u2", "|i1", "<i1", ">i1", "|u1", "<u1",
    ">u1",
];

/// Reads a 4-D q, k or v file in the type it holds.
fn read_stored(path: &Path, what: &str, expected: &str) -> Result<Stored, Error> {
    let mut opened = open_npy(path)?;
    let wrong = |reason: String| Error::Io {
        what: format!(
            "cannot read {what} from `{}` (expected {expected})",
            path.display()
        ),
        reason,
    };
    if let Some(reason) = wrong_descr(&opened, &STORED) {
        return Err(wrong(reason));
    }
    let Some(descr) = opened.header.as_ref().map(|h| h.descr.clone()) else {
        // Not an .npy file (no header attnc could read): the reader says why.
        return Err(wrong(read_as::<f32>(opened).err().unwrap_or_else(|| {
            "its header is not one attnc reads".to_string()
        })));
    };
    let size = match &descr[1..] {
        "f8" => 8,
        "f4" => 4,
        "f2" | "u2" => 2,
        _ => 1,
    };
    check_claim(&opened, path, what, size, if size == 8 { 4 } else { 0 })?;
    let stored = match &descr[1..] {
        "f8" => Stored::F64(read_as::<f64>(opened).map_err(wrong)?.mapv(|x| x as f32)),
        "f4" => Stored::F32(read_as::<f32>(opened).map_err(wrong)?),
        "f2" => {
            // The reader has no float16: the same bytes as uint16 bits.
            let prefix = opened.reader.get_mut().0.get_mut();
            let at = find(prefix, descr.as_bytes()).expect("the header holds its descriptor");
            prefix[at + 1] = b'u';
            Stored::F16(
                read_as::<u16>(opened)
                    .map_err(wrong)?
                    .mapv(half::f16::from_bits),
            )
        }
        "u2" => Stored::U16(read_as::<u16>(opened).map_err(wrong)?),
        "i1" => Stored::I8(read_as::<i8>(opened).map_err(wrong)?),
        _ => Stored::U8(read_as::<u8>(opened).map_err(wrong)?),
    };
    let shape = match &stored {
        Stored::F32(a) | Stored::F64(a) => a.shape().to_vec(),
        Stored::F16(a) => a.shape().to_vec(),
        Stored::U16(a) => a.shape().to_vec(),
        Stored::I8(a) => a.shape().to_vec(),
        Stored::U8(a) => a.shape().to_vec(),
    };
    if shape.len() != 4 {
        return Err(Error::Io {
            what: format!("{what} in `{}` has shape {shape:?}", path.display()),
            reason: format!(
                "{what} must be 4-dimensional: {}",
                match what {
                    "q" => "[B, H, Q, D]",
                    "k_pages" | "v_pages" => "[num_pages, page_size, HKV, D]",
                    _ => "[B, HKV, KV, D]",
                }
            ),
        });
    }
    Ok(stored)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn four<T>(a: ArrayD<T>) -> ndarray::Array4<T> {
    a.into_dimensionality().expect("checked 4-dimensional")
}

/// Reads q for a call in `elem` (f32, bf16 or f16), as f32 holding values of
/// that type: float32 and float64 files are rounded to it (nearest, ties to
/// even; float64 first to float32), a float16 file is taken as it is with
/// `elem` f16, and a uint16 file as bf16 bit patterns with `elem` bf16.
/// Returns a note on any conversion, for the caller to show.
pub fn read_q(
    path: &Path,
    elem: crate::tensor::ElemType,
) -> Result<(ndarray::Array4<f32>, Option<String>), Error> {
    use crate::tensor::ElemType;
    let stored = read_stored(
        path,
        "q",
        "a float32 or float64 .npy, or one in the --dtype's own type",
    )?;
    let kind = stored.kind();
    let note = |to: &str| Some(format!("{kind}; {to}"));
    match (stored, elem) {
        (Stored::F32(a), ElemType::F32) => Ok((four(a), None)),
        (Stored::F64(a), ElemType::F32) => Ok((four(a), note("converted to float32"))),
        (Stored::F32(a) | Stored::F64(a), ElemType::Bf16 | ElemType::F16) => {
            let to = format!("rounded to {elem}{}", overflowed(&a, elem));
            Ok((four(a).mapv(|x| elem.round(x)), note(&to)))
        }
        (Stored::F16(a), ElemType::F16) => Ok((four(a.mapv(half::f16::to_f32)), None)),
        (Stored::U16(a), ElemType::Bf16) => {
            Ok((four(a.mapv(|b| half::bf16::from_bits(b).to_f32())), None))
        }
        (stored, elem) => Err(type_mismatch(path, "q", stored.kind(), elem, "--dtype")),
    }
}

/// The error for a file whose type does not go with the call's type.
fn type_mismatch(
    path: &Path,
    what: &str,
    kind: &str,
    elem: crate::tensor::ElemType,
    flag: &str,
) -> Error {
    let fix = match kind {
        "int8" | "uint8 (fp8 bits)" if what == "q" => {
            "q is float32, bf16 or f16 (int8 and fp8 are types of the K/V cache, `--kv-dtype`)".to_string()
        }
        "float16" => format!("float16 data goes with `{flag} f16`"),
        "uint16 (bf16 bits)" => {
            format!("numpy has no bf16: uint16 files are bf16 bit patterns, read with `{flag} bf16`")
        }
        "int8" => "int8 data goes with `--kv-dtype int8` and its scales (`--k-scales`, `--v-scales`)".to_string(),
        "uint8 (fp8 bits)" => "uint8 data is fp8 e4m3fn bits: use `--kv-dtype fp8` with its scales (`--k-scales`, `--v-scales`)".to_string(),
        _ => "give float32 or float64 data, which attnc rounds or quantizes to the call's type".to_string(),
    };
    Error::Io {
        what: format!("cannot read {what} from `{}` as {elem}", path.display()),
        reason: format!("the file holds {kind} data; {fix}"),
    }
}

/// For the note of a file rounded to `elem`: how many of its finite values
/// lie beyond the type's range and round to ±inf (f16 past ±65504), or
/// nothing when none do.
fn overflowed(a: &ArrayD<f32>, elem: crate::tensor::ElemType) -> String {
    let n = a
        .iter()
        .filter(|x| x.is_finite() && !elem.round(**x).is_finite())
        .count();
    match n {
        0 => String::new(),
        1 => format!(" (1 finite value is beyond {elem}'s range and became ±inf)"),
        n => format!(" ({n} finite values are beyond {elem}'s range and became ±inf)"),
    }
}

/// Reads k or v (or a page pool) for a call whose K/V are stored as `elem`.
/// float32 and float64 files are rounded (bf16, f16) or quantized with a
/// scale per (token, KV head) (int8, fp8); files already in the type are
/// taken as they are: float16 for f16, uint16 bf16 bit patterns for bf16,
/// and int8 or uint8 (e4m3fn bits) with their float32 scales `scales`
/// (`[A, B, C]` for data `[A, B, C, D]`), which quantized files need and
/// float files must not have. Returns a note on any conversion.
pub fn read_kv(
    path: &Path,
    what: &str,
    elem: crate::tensor::ElemType,
    scales: Option<(&Path, &str)>,
) -> Result<(crate::tensor::KvArray, Option<String>), Error> {
    use crate::tensor::{ElemType, KvArray};
    let stored = read_stored(
        path,
        what,
        "a float32 or float64 .npy, or one in the --kv-dtype's own type",
    )?;
    let kind = stored.kind();
    let quantized_file = matches!(stored, Stored::I8(_) | Stored::U8(_));
    if let (Some((_, flag)), false) = (scales, quantized_file) {
        return Err(Error::Io {
            what: format!("`{flag}` with {what} from `{}`", path.display()),
            reason: format!(
                "the file holds {kind} data, which attnc quantizes itself (with scales of its own); scales go with int8 or uint8 (fp8) files: drop `{flag}`"
            ),
        });
    }
    let read_scales = |flag_what: &str| -> Result<ndarray::Array3<f32>, Error> {
        let Some((sp, flag)) = scales else {
            return Err(Error::Io {
                what: format!("{what} from `{}` is {kind} without scales", path.display()),
                reason: format!(
                    "quantized {flag_what} data needs a float32 scale per (token, KV head): pass `--{}-scales FILE.npy`",
                    &what[..1]
                ),
            });
        };
        let a = read_f32_dyn(sp).map_err(|e| match e {
            Error::Io { reason, .. } => Error::Io {
                what: format!(
                    "cannot read the scales of `{flag}` from `{}` (expected float32)",
                    sp.display()
                ),
                reason,
            },
            e => e,
        })?;
        let shape = a.shape().to_vec();
        a.into_dimensionality().map_err(|_| Error::Io {
            what: format!("`{flag}` `{}` has shape {shape:?}", sp.display()),
            reason: "scales are 3-dimensional: [B, HKV, KV] for dense k/v, [num_pages, page_size, HKV] for a pool".to_string(),
        })
    };
    let note = |to: String| Some(format!("{kind}; {to}"));
    match (stored, elem) {
        (Stored::F32(a), ElemType::F32) => Ok((KvArray::F32(four(a)), None)),
        (Stored::F32(a) | Stored::F64(a), elem) => {
            let to = match elem {
                ElemType::F32 => "converted to float32".to_string(),
                ElemType::Bf16 | ElemType::F16 => {
                    format!("rounded to {elem}{}", overflowed(&a, elem))
                }
                _ => format!("quantized to {elem} with a scale per (token, KV head)"),
            };
            Ok((KvArray::quantize(four(a).view(), elem), note(to)))
        }
        (Stored::F16(a), ElemType::F16) => Ok((KvArray::F16(four(a)), None)),
        (Stored::U16(a), ElemType::Bf16) => {
            Ok((KvArray::Bf16(four(a.mapv(half::bf16::from_bits))), None))
        }
        (Stored::I8(a), ElemType::Int8) => Ok((
            KvArray::Int8 {
                data: four(a),
                scales: read_scales("int8")?,
            },
            None,
        )),
        (Stored::U8(a), ElemType::Fp8) => Ok((
            KvArray::Fp8 {
                data: four(a),
                scales: read_scales("fp8")?,
            },
            None,
        )),
        (stored, elem) => Err(type_mismatch(path, what, stored.kind(), elem, "--kv-dtype")),
    }
}

/// Reads a buffer in its declared element type.
pub fn read_buffer(path: &Path, name: &str, ty: Type) -> Result<BufferData, Error> {
    read_buffer_of(path, Subject::Buffer(name), ty, false).map(|(data, _)| data)
}

/// Reads an index table of a call (a page table, sequence lengths), int32
/// or int64 data; `what` names it in errors (e.g. "`page_table`
/// (--page-table)").
pub fn read_ints(path: &Path, what: &str) -> Result<ndarray::ArrayD<i64>, Error> {
    match read_buffer_of(path, Subject::Table(what), Type::Int, false)? {
        (BufferData::Int(a), _) => Ok(a),
        _ => unreachable!("read as int"),
    }
}

/// What a file is read as, for its errors.
enum Subject<'a> {
    /// A buffer of the spec, by name.
    Buffer(&'a str),
    /// An index table of the call, described.
    Table(&'a str),
}

/// [`read_buffer`] that also takes float64 data for a float buffer and
/// converts it to float32; the flag says whether it did.
pub fn read_buffer_converting(
    path: &Path,
    name: &str,
    ty: Type,
) -> Result<(BufferData, bool), Error> {
    read_buffer_of(path, Subject::Buffer(name), ty, true)
}

fn read_buffer_of(
    path: &Path,
    subject: Subject<'_>,
    ty: Type,
    allow_f64: bool,
) -> Result<(BufferData, bool), Error> {
    let opened = open_npy(path)?;
    let takes = match ty {
        Type::Int => "int32 or int64 data",
        Type::Float if allow_f64 => "float32 or float64 data",
        Type::Float => "float32 data",
        Type::Bool => "bool data",
    };
    let (what, takes) = match subject {
        Subject::Buffer(name) => (
            format!("buffer `{name}`"),
            format!("it is declared {ty}, which takes {takes}"),
        ),
        Subject::Table(what) => (what.to_string(), format!("it takes {takes}")),
    };
    let wrong = |reason: String| Error::Io {
        what: format!("cannot read {what} from `{}`: {takes}", path.display()),
        reason,
    };
    let int32 = wrong_descr(&opened, &I32).is_none() && opened.header.is_some();
    let f64 = allow_f64 && ty == Type::Float && holds_f64(&opened);
    let (accepted, elem, extra): (&[&str], usize, usize) = match ty {
        Type::Int if int32 => (&I32, 4, 8),
        Type::Int => (&I64, 8, 0),
        Type::Float if f64 => (&F32_F64, 8, 4),
        Type::Float => (&F32, 4, 0),
        Type::Bool => (&BOOL, 1, 0),
    };
    if let Some(reason) = wrong_descr(&opened, accepted) {
        return Err(wrong(reason));
    }
    check_claim(&opened, path, &what, elem, extra)?;
    let data = match ty {
        Type::Int if int32 => {
            BufferData::Int(read_as::<i32>(opened).map_err(wrong)?.mapv(i64::from))
        }
        Type::Int => BufferData::Int(read_as::<i64>(opened).map_err(wrong)?),
        Type::Float if f64 => {
            BufferData::Float(read_as::<f64>(opened).map_err(wrong)?.mapv(|x| x as f32))
        }
        Type::Float => BufferData::Float(read_as::<f32>(opened).map_err(wrong)?),
        Type::Bool => BufferData::Bool(read_as::<bool>(opened).map_err(wrong)?),
    };
    Ok((data, f64))
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

/// Writes the output `out` in `elem` to `w`: float32; float16 (`<f2`); or
/// bf16 as uint16 bit patterns (`<u2`, numpy having no bf16), each value
/// rounded to nearest, ties to even.
///
/// # Panics
///
/// If `elem` is quantized (int8, fp8: no output type).
pub fn write_out<W: std::io::Write>(
    w: &mut W,
    out: &ndarray::Array4<f32>,
    elem: crate::tensor::ElemType,
) -> Result<(), String> {
    use crate::tensor::ElemType;
    match elem {
        ElemType::F32 => out.write_npy(w).map_err(|e| e.to_string()),
        ElemType::Bf16 => out
            .mapv(|x| half::bf16::from_f32(x).to_bits())
            .write_npy(w)
            .map_err(|e| e.to_string()),
        ElemType::F16 => {
            // ndarray-npy has no float16: the header and data by hand.
            let shape: Vec<String> = out.shape().iter().map(|n| n.to_string()).collect();
            let header = format!(
                "{{'descr': '<f2', 'fortran_order': False, 'shape': ({}), }}",
                shape.join(", ")
            );
            let data: Vec<u8> = out
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect();
            w.write_all(&v1_file_bytes(&header, &data))
                .map_err(|e| e.to_string())
        }
        ElemType::Int8 | ElemType::Fp8 => panic!("{elem} is no output type"),
    }
}

/// Reads any float32 array (for tests and tools).
pub fn read_f32_dyn(path: &Path) -> Result<ArrayD<f32>, Error> {
    let opened = open_npy(path)?;
    let wrong = |reason: String| Error::Io {
        what: format!("cannot read `{}`", path.display()),
        reason,
    };
    if let Some(reason) = wrong_descr(&opened, &F32) {
        return Err(wrong(reason));
    }
    check_claim(&opened, path, "an array", 4, 0)?;
    read_as::<f32>(opened).map_err(wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float64_is_converted_only_where_asked() {
        let tmp = tempfile::Builder::new()
            .prefix("attnc-npy-f64-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let path = dir.join("q64.npy");
        let a = ndarray::Array4::<f64>::from_shape_fn((1, 2, 3, 4), |(_, h, q, d)| {
            (h * 12 + q * 4 + d) as f64 * 0.1
        });
        a.write_npy(std::io::BufWriter::new(File::create(&path).unwrap()))
            .unwrap();
        let (got, converted) = read_float_4d(&path, "q").unwrap();
        assert!(converted);
        assert_eq!(got, a.mapv(|x| x as f32));
        assert!(read_f32_4d(&path, "q").is_err());
        let a1 = ndarray::Array1::<f64>::from(vec![0.5, -2.0]);
        a1.write_npy(std::io::BufWriter::new(File::create(&path).unwrap()))
            .unwrap();
        let (data, converted) = read_buffer_converting(&path, "s", Type::Float).unwrap();
        assert!(converted);
        match data {
            BufferData::Float(f) => assert_eq!(f.as_slice().unwrap(), &[0.5f32, -2.0]),
            _ => panic!("a float buffer"),
        }
        assert!(read_buffer(&path, "s", Type::Float).is_err());
        assert!(read_buffer_converting(&path, "s", Type::Int).is_err());
    }

    #[test]
    fn headers_are_read_as_numpy_writes_them() {
        let h = parse_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2147483648, 16), }   \n",
        )
        .unwrap();
        assert_eq!(h.descr, "<f4");
        assert_eq!(h.shape, vec![1, 1, 1 << 31, 16]);
        assert_eq!(h.shape_text(), "[1, 1, 2147483648, 16]");
        let h = parse_header("{'descr': '|b1', 'fortran_order': False, 'shape': (7,), }").unwrap();
        assert_eq!(h.shape, vec![7]);
        let h = parse_header("{'shape': (), 'descr': '<i8', 'fortran_order': False}").unwrap();
        assert_eq!((h.shape.clone(), h.elements()), (vec![], 1));
        // Python's forms of the same values: double quotes, other spacing,
        // integers with `_` and prefixes, and the last of a key given twice.
        let h = parse_header(
            "{\"descr\":\"<f4\",\"fortran_order\":True,\"shape\":( 0x10 ,1_000,0b11,)}",
        )
        .unwrap();
        assert_eq!(h.shape, vec![16, 1000, 3]);
        let h = parse_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'shape': (1000000000000,)}",
        )
        .unwrap();
        assert_eq!(h.shape, vec![1_000_000_000_000]);
        // A structured descriptor is kept as text for messages.
        let h = parse_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}")
            .unwrap();
        assert_eq!(h.shape, vec![2]);
    }

    /// A header the checks cannot read is refused, so that the `.npy`
    /// reader never allocates what an unchecked header claims.
    #[test]
    fn headers_attnc_cannot_read_are_refused() {
        for dict in [
            "{'descr': '<f4', 'shape': (99999999999999999999999,), }",
            "{'descr': '<f4', 'shape': (-1,), }",
            "{'descr': '<f4', 'shape': (1.5,), }",
            "{'descr': '<f4', 'shape': [1, 2], }",
            "{'descr': '<f4', 'shape': (1), }",
            "{'descr': '<f4', 'sh\\x61pe': (1,), }",
            "{'descr': '<f4'}",
            "{'descr': '<f4', 'shape': (1,)} trailing",
            "{'descr': '<f4', 'shape': (1 2,)}",
            "",
        ] {
            assert_eq!(parse_header(dict), None, "{dict}");
        }
    }

    /// A shape whose axes multiply beyond an isize is an error even when an
    /// axis is 0 (the `.npy` reader panicked on it).
    #[test]
    fn shapes_no_array_can_hold_are_errors() {
        let dict =
            "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 2147483648, 2, 2147483648), }";
        let bytes = v1_file_bytes(dict, &[]);
        let file = tempfile::Builder::new()
            .prefix("attnc-npy-unit-")
            .suffix(".npy")
            .tempfile()
            .unwrap();
        let path = file.path();
        std::fs::write(path, &bytes).unwrap();
        let q = read_f32_4d(path, "q").unwrap_err().to_string();
        let doc = read_buffer(path, "doc", Type::Int).unwrap_err().to_string();
        assert!(q.contains("which no array can hold"), "{q}");
        assert!(doc.starts_with("cannot read buffer `doc` from"), "{doc}");
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
        let mut a = ArrayD::<f32>::zeros(ndarray::IxDyn(&[3]));
        assert_eq!(overflowed(&a, crate::tensor::ElemType::F16), "");
        a[[0]] = 7e4;
        a[[1]] = f32::NAN;
        assert_eq!(
            overflowed(&a, crate::tensor::ElemType::F16),
            " (1 finite value is beyond f16's range and became ±inf)"
        );
        assert_eq!(overflowed(&a, crate::tensor::ElemType::Bf16), "");
        for d in ["=f4", "|f4", "f4"] {
            assert_eq!(
                plain_reason(&format!("incorrect descriptor ('{d}') for this type")),
                format!(
                    "the file holds float32 data without an explicit byte order (descriptor `{d}`), \
                     which attnc does not read: save it as numpy does, `np.save(path, a.astype('<f4'))`"
                )
            );
        }
        assert!(
            plain_reason("error parsing header: start does not match magic string")
                .starts_with("not an .npy file")
        );
        assert_eq!(plain_reason("some other error"), "some other error");
    }
}
