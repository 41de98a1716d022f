//! The JIT module: creates a Cranelift `JITModule` for the host with the flags that
//! suit generated kernels, defines functions through a closure that builds their IR,
//! links, and hands the finalized code to a [`JitCode`] that owns (and on drop frees)
//! it.
//!
//! ```text
//! JitModule::new(&JitOptions, symbols) --declare_*/define_function--> JitModule
//!     --finalize--> JitCode (Send + Sync; function pointers valid while it lives)
//! ```
//!
//! Flags: `opt_level` (`none` by default, see the module docs of `clif`), `is_pic =
//! false` and `use_colocated_libcalls = false` (required by the JIT), the verifier on
//! in debug builds, and the host ISA from `cranelift_native` (which sets `has_fma`,
//! `has_avx`, `has_sse41`, ... from the running CPU).

use super::super::CodegenError;
use cranelift_codegen::ir::{types, AbiParam, FuncRef, Signature, Type, UserFuncName};
use cranelift_codegen::isa::{OwnedTargetIsa, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use std::time::{Duration, Instant};

/// Cranelift's optimisation level for generated code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OptLevel {
    /// No optimisation passes (the default: fastest to compile, and register-tiled code
    /// written by the front end keeps its schedule).
    #[default]
    None,
    /// Cranelift's `speed` (egraph) pipeline.
    Speed,
}

/// Options of a [`JitModule`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitOptions {
    /// Cranelift optimisation level.
    pub opt_level: OptLevel,
    /// Run Cranelift's IR verifier on each function (costs ~0.4-1.5 ms per 1k-5k
    /// instructions).
    pub verify: bool,
    /// Keep the CLIF text of each function (for `--emit clif`).
    pub keep_clif: bool,
    /// Keep Cranelift's machine-code listing (VCode) of each function.
    pub keep_disasm: bool,
    /// Check the bounds of every buffer read, also those the optimiser proved
    /// in range (which otherwise have no check): a proven read found out of
    /// range is a compiler bug and panics. For tests; costs speed.
    pub check_proven_loads: bool,
}

impl Default for JitOptions {
    fn default() -> Self {
        JitOptions {
            opt_level: OptLevel::None,
            verify: cfg!(debug_assertions),
            keep_clif: false,
            keep_disasm: false,
            check_proven_loads: false,
        }
    }
}

/// What was recorded about one defined function.
#[derive(Clone, Debug, Default)]
pub struct FunctionInfo {
    /// The function's name.
    pub name: String,
    /// Its CLIF text, when [`JitOptions::keep_clif`] is set.
    pub clif: Option<String>,
    /// Its machine-code listing, when [`JitOptions::keep_disasm`] is set.
    pub disasm: Option<String>,
    /// Machine-code bytes.
    pub code_size: usize,
    /// Time spent in Cranelift (lowering, register allocation, emission).
    pub compile_time: Duration,
}

/// Lets a function body refer to other functions of the module (or imported symbols).
pub struct FuncRefs<'m> {
    module: &'m mut JITModule,
}

impl FuncRefs<'_> {
    /// A reference, usable in `call` instructions of the function being built, to the
    /// function `id` (declared with [`JitModule::declare_function`] or
    /// [`JitModule::declare_import`]).
    pub fn func_ref(&mut self, builder: &mut FunctionBuilder<'_>, id: FuncId) -> FuncRef {
        self.module.declare_func_in_func(id, builder.func)
    }
}

/// A JIT module being built: declare functions, define them, then [`finalize`].
///
/// [`finalize`]: JitModule::finalize
pub struct JitModule {
    module: JITModule,
    ctx: Context,
    fctx: FunctionBuilderContext,
    options: JitOptions,
    defined: Vec<(FuncId, String)>,
    infos: Vec<FunctionInfo>,
}

/// The host ISA with the flags of `options`.
pub fn host_isa(options: &JitOptions) -> Result<OwnedTargetIsa, CodegenError> {
    let mut flags = settings::builder();
    let opt = match options.opt_level {
        OptLevel::None => "none",
        OptLevel::Speed => "speed",
    };
    let verify = if options.verify { "true" } else { "false" };
    for (name, value) in [
        ("opt_level", opt),
        ("is_pic", "false"),
        ("use_colocated_libcalls", "false"),
        ("enable_verifier", verify),
    ] {
        flags
            .set(name, value)
            .map_err(|e| CodegenError::Isa(format!("flag {name}={value}: {e}")))?;
    }
    let isa_builder = cranelift_native::builder().map_err(|e| CodegenError::Isa(e.to_string()))?;
    isa_builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| CodegenError::Isa(e.to_string()))
}

fn cranelift_error(function: &str, e: impl std::fmt::Display) -> CodegenError {
    CodegenError::Cranelift {
        function: function.to_string(),
        message: e.to_string(),
    }
}

impl JitModule {
    /// A new module for the host CPU; `symbols` are `(name, address)` pairs that
    /// imported functions resolve to (for example `TileKernels::symbols`).
    pub fn new(
        options: &JitOptions,
        symbols: &[(&str, *const u8)],
    ) -> Result<JitModule, CodegenError> {
        let isa = host_isa(options)?;
        let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
        for &(name, ptr) in symbols {
            builder.symbol(name, ptr);
        }
        let module = JITModule::new(builder);
        let mut ctx = module.make_context();
        ctx.set_disasm(options.keep_disasm);
        Ok(JitModule {
            module,
            ctx,
            fctx: FunctionBuilderContext::new(),
            options: options.clone(),
            defined: Vec::new(),
            infos: Vec::new(),
        })
    }

    /// The target ISA (flags, pointer type, features).
    pub fn isa(&self) -> &dyn TargetIsa {
        self.module.isa()
    }

    /// Whether the target fuses `fma` into one instruction (x86 `has_fma`, always on
    /// aarch64). Without it, a vector `fma` becomes four libm calls; emitters should then
    /// use `fmul` + `fadd`.
    pub fn has_native_fma(&self) -> bool {
        // x86-64 has a `has_fma` ISA flag; targets without the flag always fuse.
        match self.isa().isa_flags().iter().find(|f| f.name == "has_fma") {
            Some(flag) => flag.as_bool() == Some(true),
            None => true,
        }
    }

    /// The pointer type (`i64` on 64-bit hosts).
    pub fn pointer_type(&self) -> Type {
        self.module.target_config().pointer_type()
    }

    /// A signature with the host's default calling convention (SystemV on x86-64 Linux,
    /// what `extern "C"` uses).
    pub fn signature(&self, params: &[Type], returns: &[Type]) -> Signature {
        let mut sig = self.module.make_signature();
        sig.params.extend(params.iter().map(|&t| AbiParam::new(t)));
        sig.returns
            .extend(returns.iter().map(|&t| AbiParam::new(t)));
        sig
    }

    /// Declares a function defined in this module (later, by [`Self::define_function`]).
    pub fn declare_function(
        &mut self,
        name: &str,
        sig: &Signature,
    ) -> Result<FuncId, CodegenError> {
        self.module
            .declare_function(name, Linkage::Local, sig)
            .map_err(|e| cranelift_error(name, e))
    }

    /// Declares a function defined outside (a symbol given to [`Self::new`]).
    pub fn declare_import(&mut self, name: &str, sig: &Signature) -> Result<FuncId, CodegenError> {
        self.module
            .declare_function(name, Linkage::Import, sig)
            .map_err(|e| cranelift_error(name, e))
    }

    /// Defines the function `id`: `build` fills the body through the builder (whose
    /// signature is already set), the builder is sealed and finalized, and Cranelift
    /// compiles it.
    pub fn define_function<F>(
        &mut self,
        id: FuncId,
        build: F,
    ) -> Result<&FunctionInfo, CodegenError>
    where
        F: FnOnce(&mut FunctionBuilder<'_>, &mut FuncRefs<'_>) -> Result<(), CodegenError>,
    {
        let decl = self.module.declarations().get_function_decl(id);
        let name = decl.linkage_name(id).into_owned();
        let signature = decl.signature.clone();
        self.module.clear_context(&mut self.ctx);
        self.ctx.set_disasm(self.options.keep_disasm);
        self.ctx.func.signature = signature;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        {
            let mut builder = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
            let mut refs = FuncRefs {
                module: &mut self.module,
            };
            build(&mut builder, &mut refs)?;
            builder.seal_all_blocks();
            builder.finalize(self.module.target_config());
        }
        let clif = self
            .options
            .keep_clif
            .then(|| self.ctx.func.display().to_string());
        let start = Instant::now();
        self.module
            .define_function(id, &mut self.ctx)
            .map_err(|e| cranelift_error(&name, format!("{e:?}")))?;
        let compile_time = start.elapsed();
        let compiled = self.ctx.compiled_code();
        let info = FunctionInfo {
            name: name.clone(),
            clif,
            disasm: compiled.and_then(|c| c.vcode.clone()),
            code_size: compiled.map_or(0, |c| c.code_buffer().len()),
            compile_time,
        };
        self.defined.push((id, name));
        self.infos.push(info);
        Ok(self.infos.last().expect("just pushed"))
    }

    /// Information on the functions defined so far, in definition order.
    pub fn infos(&self) -> &[FunctionInfo] {
        &self.infos
    }

    /// Links the module and makes its code executable.
    pub fn finalize(mut self) -> Result<JitCode, CodegenError> {
        self.module
            .finalize_definitions()
            .map_err(|e| cranelift_error("<module>", e))?;
        let functions = self
            .defined
            .iter()
            .map(|(id, name)| {
                (
                    name.clone(),
                    self.module.get_finalized_function(*id) as usize,
                )
            })
            .collect();
        Ok(JitCode {
            module: Some(self.module),
            functions,
            infos: self.infos,
        })
    }
}

/// Finalized machine code: the function addresses of a linked module, valid while this
/// value lives. Dropping it frees the code.
pub struct JitCode {
    module: Option<JITModule>,
    functions: Vec<(String, usize)>,
    infos: Vec<FunctionInfo>,
}

// SAFETY: `JITModule` is `Send` but not `Sync`. After finalization no method of the
// module is reachable through `&JitCode` (only the copied function addresses are), and
// the module itself is touched only in `Drop`, which has exclusive access.
unsafe impl Sync for JitCode {}

impl JitCode {
    /// The address of the function `name`.
    pub fn address(&self, name: &str) -> Result<*const u8, CodegenError> {
        self.functions
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, addr)| addr as *const u8)
            .ok_or_else(|| CodegenError::UnknownFunction(name.to_string()))
    }

    /// The function `name` as a function pointer of type `F`.
    ///
    /// # Safety
    ///
    /// `F` must be an `extern "C"` function pointer type matching the function's
    /// Cranelift signature, and it may only be called while `self` lives.
    pub unsafe fn function<F: Copy>(&self, name: &str) -> Result<F, CodegenError> {
        assert_eq!(
            std::mem::size_of::<F>(),
            std::mem::size_of::<*const u8>(),
            "function pointer types are pointer-sized"
        );
        let addr = self.address(name)?;
        Ok(std::mem::transmute_copy::<*const u8, F>(&addr))
    }

    /// Information on each defined function.
    pub fn infos(&self) -> &[FunctionInfo] {
        &self.infos
    }
}

impl Drop for JitCode {
    fn drop(&mut self) {
        if let Some(module) = self.module.take() {
            // SAFETY: the addresses handed out are documented to be valid only while
            // `self` lives, so nothing can call into this code any more.
            unsafe { module.free_memory() };
        }
    }
}

impl std::fmt::Debug for JitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitCode")
            .field(
                "functions",
                &self.functions.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The f32x4 vector type.
pub const F32X4: Type = types::F32X4;

#[cfg(test)]
mod tests {
    use super::*;
    use cranelift_codegen::ir::InstBuilder;

    #[test]
    fn defines_calls_and_imports() {
        extern "C" fn triple(x: i64) -> i64 {
            3 * x
        }
        let options = JitOptions {
            keep_clif: true,
            keep_disasm: true,
            ..JitOptions::default()
        };
        let mut jit = JitModule::new(&options, &[("attnc_test_triple", triple as *const u8)])
            .expect("host is supported");
        let sig = jit.signature(&[types::I64], &[types::I64]);
        let imported = jit.declare_import("attnc_test_triple", &sig).unwrap();
        let f = jit.declare_function("add_one_then_triple", &sig).unwrap();
        let info = jit
            .define_function(f, |b, refs| {
                let entry = b.create_block();
                b.append_block_params_for_function_params(entry);
                b.switch_to_block(entry);
                let x = b.block_params(entry)[0];
                let y = b.ins().iadd_imm_s(x, 1);
                let callee = refs.func_ref(b, imported);
                let call = b.ins().call(callee, &[y]);
                let r = b.inst_results(call)[0];
                b.ins().return_(&[r]);
                Ok(())
            })
            .unwrap();
        assert!(info.clif.as_deref().unwrap().contains("call fn0"));
        assert!(info.disasm.as_deref().is_some_and(|d| !d.is_empty()));
        assert!(info.code_size > 0);
        let code = jit.finalize().unwrap();
        let func: extern "C" fn(i64) -> i64 =
            unsafe { code.function("add_one_then_triple") }.unwrap();
        assert_eq!(func(4), 15);
        assert!(matches!(
            code.address("missing"),
            Err(CodegenError::UnknownFunction(name)) if name == "missing"
        ));
    }

    #[test]
    fn code_is_send_and_sync_and_callable_from_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<JitCode>();
        let mut jit = JitModule::new(&JitOptions::default(), &[]).unwrap();
        let sig = jit.signature(&[types::I64], &[types::I64]);
        let f = jit.declare_function("square", &sig).unwrap();
        jit.define_function(f, |b, _| {
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let x = b.block_params(entry)[0];
            let y = b.ins().imul(x, x);
            b.ins().return_(&[y]);
            Ok(())
        })
        .unwrap();
        let code = std::sync::Arc::new(jit.finalize().unwrap());
        let handles: Vec<_> = (0..2i64)
            .map(|t| {
                let code = code.clone();
                std::thread::spawn(move || {
                    let func: extern "C" fn(i64) -> i64 =
                        unsafe { code.function("square") }.unwrap();
                    (0..100).map(|i| func(i + t)).sum::<i64>()
                })
            })
            .collect();
        let sums: Vec<i64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(sums[0], (0..100).map(|i| i * i).sum::<i64>());
        assert_eq!(sums[1], (1..101).map(|i| i * i).sum::<i64>());
    }

    #[test]
    fn host_has_fma_flag_on_x86() {
        let jit = JitModule::new(&JitOptions::default(), &[]).unwrap();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                jit.has_native_fma(),
                std::arch::is_x86_feature_detected!("fma")
            );
        }
        assert_eq!(jit.pointer_type(), types::I64);
    }
}
