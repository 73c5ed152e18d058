//! Backbone runs through an ONNX Runtime `IoBinding`.
//!
//! On a GPU the batch is copied into a host buffer from the CUDA EP's pinned
//! (page-locked) allocator and the output is bound to pinned host memory too:
//! binding the input starts its host-to-device copy as a DMA transfer (no
//! staging copy through a pageable bounce buffer), and the feature map comes
//! back the same way. Both allocations come from ONNX Runtime's arena, so after
//! the first batch of a size they cost nothing. On CPU the same code binds
//! buffers from the session's CPU allocator (no copy at all), which is what the
//! CPU tests exercise.

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{Tensor, TensorValueType};

use super::providers::CPU_PROVIDER;
use super::runtime::InferError;

/// Where bound buffers live, and the binding that reuses them between runs.
pub(crate) struct Bound {
    binding: IoBinding,
    input_allocator: Allocator,
    /// The last input buffer, reused while the batch shape stays the same.
    input: Option<(Vec<i64>, Tensor<f32>)>,
    /// Where the output is bound: pinned host memory or the CPU.
    output_info: MemoryInfo<'static>,
    /// "CudaPinned" or "Cpu": the memory the output must come back in.
    memory: &'static str,
}

fn run_err(what: &str) -> impl Fn(ort::Error) -> InferError + '_ {
    move |e| InferError::Run(format!("{what}: {e}"))
}

impl Bound {
    /// Sets up binding for a session on `provider`: pinned host memory on a
    /// GPU (CUDA device `cuda_device`), the CPU allocator otherwise.
    pub(crate) fn new(
        session: &Session,
        provider: &str,
        cuda_device: i32,
        output: &str,
    ) -> Result<Bound, ort::Error> {
        let (device, memory, input_type, output_type) = if provider == CPU_PROVIDER {
            (
                AllocationDevice::CPU,
                "Cpu",
                MemoryType::Default,
                MemoryType::Default,
            )
        } else {
            (
                AllocationDevice::CUDA_PINNED,
                "CudaPinned",
                MemoryType::CPUInput,
                MemoryType::CPUOutput,
            )
        };
        // ONNX Runtime registers the pinned allocator under device id 0 in some
        // releases and under the GPU's ordinal in others: try both.
        let ids = if cuda_device == 0 || provider == CPU_PROVIDER {
            vec![0]
        } else {
            vec![cuda_device, 0]
        };
        let mut last = None;
        for id in ids {
            let attempt = MemoryInfo::new(device.clone(), id, AllocatorType::Device, input_type)
                .and_then(|info| Allocator::new(session, info))
                .and_then(|alloc| {
                    let out_info =
                        MemoryInfo::new(device.clone(), id, AllocatorType::Device, output_type)?;
                    let mut binding = session.create_binding()?;
                    binding.bind_output_to_device(output, &out_info)?;
                    Ok((alloc, binding, out_info))
                });
            match attempt {
                Ok((input_allocator, binding, output_info)) => {
                    return Ok(Bound {
                        binding,
                        input_allocator,
                        input: None,
                        output_info,
                        memory,
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one device id was tried"))
    }

    /// Runs `session` on `batch` (`shape`, NCHW) and returns the output's
    /// shape and values.
    pub(crate) fn run(
        &mut self,
        session: &mut Session,
        input_name: &str,
        output_name: &str,
        shape: [usize; 4],
        batch: &[f32],
    ) -> Result<(Vec<i64>, Vec<f32>), InferError> {
        let dims: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
        if self.input.as_ref().is_none_or(|(d, _)| *d != dims) {
            let t = Tensor::<f32>::new(&self.input_allocator, shape)
                .map_err(run_err("cannot allocate the bound input"))?;
            self.input = Some((dims.clone(), t));
            // ONNX Runtime keeps the last output in the binding and writes the
            // next one into it: a new batch size needs an unallocated output.
            self.binding
                .bind_output_to_device(output_name, &self.output_info)
                .map_err(run_err("cannot bind the output"))?;
        }
        let (_, tensor) = self.input.as_mut().expect("allocated above");
        let len = batch.len();
        let ptr = tensor.data_ptr_mut().cast::<f32>();
        if ptr.is_null() && len > 0 {
            return Err(InferError::Run("the bound input has no buffer".into()));
        }
        // SAFETY: the tensor was allocated by the CPU or CUDA-pinned allocator
        // (host memory) with exactly `len` float32 elements, and nothing else
        // touches it while the session mutex is held. (ort's own accessors
        // refuse pinned memory under the API level this crate is built with,
        // hence the raw pointer.)
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }.copy_from_slice(batch);
        // Binding copies the input to the session's device (DMA from pinned
        // memory on CUDA); on CPU it refers to the buffer.
        self.binding
            .bind_input(input_name, &*tensor)
            .map_err(run_err("cannot bind the input"))?;
        let mut outputs = session
            .run_binding(&self.binding)
            .map_err(|e| InferError::Run(e.to_string()))?;
        self.binding
            .synchronize_outputs()
            .map_err(run_err("cannot synchronise the output"))?;
        let value = outputs
            .remove(output_name)
            .ok_or_else(|| InferError::Run(format!("output {output_name:?} was not produced")))?;
        let out = value
            .downcast::<TensorValueType<f32>>()
            .map_err(run_err(&format!("output {output_name:?}")))?;
        let place = out.memory_info().allocation_device();
        if place.as_str() != self.memory && place.as_str() != "Cpu" {
            return Err(InferError::Run(format!(
                "output {output_name:?} came back in {} memory, expected {}",
                place.as_str(),
                self.memory
            )));
        }
        let out_dims: Vec<i64> = out.shape().iter().copied().collect();
        let n = out_dims
            .iter()
            .map(|d| (*d).max(0) as usize)
            .product::<usize>();
        let ptr = out.data_ptr().cast::<f32>();
        if ptr.is_null() && n > 0 {
            return Err(InferError::Run("the bound output has no buffer".into()));
        }
        // SAFETY: host memory (checked above) holding `n` float32 values, kept
        // alive by `out` until the copy is made.
        let data = if n == 0 {
            Vec::new()
        } else {
            unsafe { std::slice::from_raw_parts(ptr, n) }.to_vec()
        };
        Ok((out_dims, data))
    }
}
