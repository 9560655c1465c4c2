//! The text every process serves on `/metrics`.
//!
//! The producer and the scaler each own a `prometheus_client` registry of their own
//! metrics; turning one into the OpenMetrics text format is the same for both, so it
//! is done here, once.

use prometheus_client::{encoding::text::encode, registry::Registry};

/// `registry` in the OpenMetrics text format, ending with `# EOF`.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn a_registry_renders_with_its_prefix_values_and_end_marker() {
        let mut registry = Registry::with_prefix("spillway_test");
        let uploads = Counter::<u64>::default();
        registry.register("uploads", "Uploads", uploads.clone());
        uploads.inc_by(3);
        let text = render(&registry);
        assert!(
            text.contains("# TYPE spillway_test_uploads counter"),
            "{text}"
        );
        assert!(text.contains("spillway_test_uploads_total 3\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
