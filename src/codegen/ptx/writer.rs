//! A small PTX writer: virtual registers by class, unique labels, and the
//! instruction text. Registers are numbered per class in creation order and
//! declared up front (`.reg .b32 %r<N>;`); ptxas does the real allocation.

use std::fmt::{self, Write};

/// A virtual register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reg {
    /// A predicate, `%pN`.
    P(u32),
    /// 32 bits (u32/s32/f16x2), `%rN`.
    R(u32),
    /// 64 bits (s64/u64 and addresses), `%rdN`.
    Rd(u32),
    /// An f32, `%fN`.
    F(u32),
    /// 16 bits (one f16 or bf16), `%hN`.
    H(u32),
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reg::P(n) => write!(f, "%p{n}"),
            Reg::R(n) => write!(f, "%r{n}"),
            Reg::Rd(n) => write!(f, "%rd{n}"),
            Reg::F(n) => write!(f, "%f{n}"),
            Reg::H(n) => write!(f, "%h{n}"),
        }
    }
}

/// An f32 immediate in PTX's exact hex form (`0f3F800000` is 1.0).
pub fn f32_imm(x: f32) -> String {
    format!("0f{:08X}", x.to_bits())
}

/// The PTX text of one kernel body under construction.
#[derive(Default)]
pub struct Writer {
    body: String,
    n_p: u32,
    n_r: u32,
    n_rd: u32,
    n_f: u32,
    n_h: u32,
    n_label: u32,
}

/// Writes one instruction: `ins!(w, "add.s64 {}, {}, {}", d, a, b)`.
macro_rules! ins {
    ($w:expr, $($arg:tt)*) => {
        $w.ins(format_args!($($arg)*))
    };
}
pub(crate) use ins;

impl Writer {
    pub fn p(&mut self) -> Reg {
        self.n_p += 1;
        Reg::P(self.n_p - 1)
    }

    pub fn r(&mut self) -> Reg {
        self.n_r += 1;
        Reg::R(self.n_r - 1)
    }

    pub fn rd(&mut self) -> Reg {
        self.n_rd += 1;
        Reg::Rd(self.n_rd - 1)
    }

    pub fn f(&mut self) -> Reg {
        self.n_f += 1;
        Reg::F(self.n_f - 1)
    }

    pub fn h(&mut self) -> Reg {
        self.n_h += 1;
        Reg::H(self.n_h - 1)
    }

    /// A fresh label `$L_<stem>_<n>`.
    pub fn label(&mut self, stem: &str) -> String {
        self.n_label += 1;
        format!("$L_{stem}_{}", self.n_label - 1)
    }

    /// Places a label.
    pub fn place(&mut self, label: &str) {
        writeln!(self.body, "{label}:").expect("writing to a String cannot fail");
    }

    /// One instruction, indented and terminated.
    pub fn ins(&mut self, text: fmt::Arguments<'_>) {
        writeln!(self.body, "\t{text};").expect("writing to a String cannot fail");
    }

    /// A comment line.
    pub fn comment(&mut self, text: &str) {
        writeln!(self.body, "\t// {text}").expect("writing to a String cannot fail");
    }

    /// A blank line and a section comment.
    pub fn section(&mut self, text: &str) {
        writeln!(self.body, "\n\t// ---- {text}").expect("writing to a String cannot fail");
    }

    /// The register declarations, one line per class (16-bit registers
    /// only when some are used).
    pub fn declarations(&self) -> String {
        let mut s = String::new();
        for (ty, stem, n) in [
            ("pred", "p", self.n_p),
            ("b32", "r", self.n_r),
            ("b64", "rd", self.n_rd),
            ("f32", "f", self.n_f),
            ("b16", "h", self.n_h),
        ] {
            if stem == "h" && n == 0 {
                continue;
            }
            writeln!(s, "\t.reg .{ty} %{stem}<{}>;", n.max(1))
                .expect("writing to a String cannot fail");
        }
        s
    }

    pub fn body(&self) -> &str {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_labels_and_text() {
        let mut w = Writer::default();
        let (a, b, p, f) = (w.rd(), w.rd(), w.p(), w.f());
        assert_eq!(
            (a.to_string(), b.to_string(), p.to_string(), f.to_string()),
            ("%rd0".into(), "%rd1".into(), "%p0".into(), "%f0".into())
        );
        ins!(w, "add.s64 {a}, {a}, {b}");
        let l = w.label("loop");
        w.place(&l);
        assert_eq!(w.body(), "\tadd.s64 %rd0, %rd0, %rd1;\n$L_loop_0:\n");
        assert_eq!(
            w.declarations(),
            "\t.reg .pred %p<1>;\n\t.reg .b32 %r<1>;\n\t.reg .b64 %rd<2>;\n\t.reg .f32 %f<1>;\n"
        );
        assert_eq!(f32_imm(1.0), "0f3F800000");
        assert_eq!(f32_imm(f32::NEG_INFINITY), "0fFF800000");
    }
}
