//! Where each matmul kernel wins: our Q8_0 and Q4_1 kernels over 30 distinct 3072x576
//! matrices (so weights stream from memory, as in decode), for 1 to 16 tokens per step.
//! `cargo run --release --example kernel_speed`
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use redline_engine::{q4_matmul::Q4Matrix, q8_matmul::Q8Matrix};
fn main() {
    // A whole model's worth of distinct matrices, so weights stream from DRAM as in decode.
    let (rows, cols, n) = (3072usize, 576usize, 30);
    let ws: Vec<Tensor> = (0..n)
        .map(|_| Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap())
        .collect();
    let q8: Vec<Q8Matrix> = ws.iter().map(|w| Q8Matrix::quantize(w).unwrap()).collect();
    let q4: Vec<Q4Matrix> = ws
        .iter()
        .map(|w| {
            Q4Matrix::from_qtensors(&[&QTensor::quantize(w, GgmlDType::Q4_1).unwrap()]).unwrap()
        })
        .collect();
    for t in [1usize, 2, 4, 8, 16, 32, 128] {
        let x: Vec<f32> = (0..t * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        // The fastest of 7 passes: on a shared machine, noise only ever adds time.
        let time = |f: &dyn Fn(usize)| {
            (0..7)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    (0..n).for_each(f);
                    t0.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let a = time(&|i| {
            std::hint::black_box(q8[i].matmul(&x, t));
        });
        let b = time(&|i| {
            std::hint::black_box(q4[i].matmul(&x, t));
        });
        println!(
            "t={t:2}: q8 {:.2} ms  q4 {:.2} ms  (30 matrices 3072x576)",
            a * 1e3,
            b * 1e3
        );
    }
}
