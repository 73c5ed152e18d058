//! Stage 4, render: the image's artifacts (preprocessed JPEG, raw maps, the
//! pre-drawn overlays) encoded on the rayon pool, once: a failed upload sends
//! the same bytes again. See [`crate::pipeline::artifacts`].

use std::sync::Arc;
use std::time::Instant;

use crate::engine::on_cpu;
use crate::pipeline::{render as render_image, Drawing, Graded, Model, Prepared, Rendered};

/// Renders one graded image; returns the artifacts and the milliseconds the
/// rendering took (on its rayon thread, not counting the wait for one).
pub async fn render(
    model: &Arc<Model>,
    image: &Arc<Prepared>,
    graded: &Graded,
    drawing: Drawing,
) -> (Rendered, f64) {
    let (m, p, g) = (model.clone(), image.clone(), graded.clone());
    let r = on_cpu(move || {
        let t = Instant::now();
        let r = render_image(&p, &g, m.manifest(), drawing);
        (r, t.elapsed().as_secs_f64() * 1e3)
    })
    .await;
    crate::observe::metrics().renders.inc();
    r
}
