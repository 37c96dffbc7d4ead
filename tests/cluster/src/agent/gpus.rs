//! GPU assignment: each node's devices are indices 0..n; a pod gets whole devices, exclusively,
//! passed to its containers as `NVIDIA_VISIBLE_DEVICES` (as NVIDIA's device plugin does).

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GpuError {
    #[error("node {node} has {free} free nvidia.com/gpu, the pod asks for {want}")]
    Insufficient {
        node: String,
        free: usize,
        want: usize,
    },
    #[error("unknown node {0}")]
    UnknownNode(String),
}

#[derive(Debug, Default)]
pub struct GpuAllocator {
    /// node -> device index -> holder (pod uid).
    nodes: BTreeMap<String, Vec<Option<String>>>,
}

impl GpuAllocator {
    pub fn new<'a>(nodes: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        Self {
            nodes: nodes
                .into_iter()
                .map(|(n, g)| (n.to_string(), vec![None; g as usize]))
                .collect(),
        }
    }

    /// The devices held by `pod` on `node`, allocating `want` of them on first call.
    /// Idempotent per pod: a second call returns the same devices.
    pub fn allocate(&mut self, node: &str, pod: &str, want: usize) -> Result<Vec<u32>, GpuError> {
        let devs = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| GpuError::UnknownNode(node.into()))?;
        let held: Vec<u32> = held_by(devs, pod);
        if !held.is_empty() || want == 0 {
            return Ok(held);
        }
        let free: Vec<usize> = (0..devs.len()).filter(|&i| devs[i].is_none()).collect();
        if free.len() < want {
            return Err(GpuError::Insufficient {
                node: node.into(),
                free: free.len(),
                want,
            });
        }
        for &i in &free[..want] {
            devs[i] = Some(pod.to_string());
        }
        Ok(held_by(devs, pod))
    }

    pub fn release(&mut self, pod: &str) {
        for devs in self.nodes.values_mut() {
            for d in devs.iter_mut() {
                if d.as_deref() == Some(pod) {
                    *d = None;
                }
            }
        }
    }

    pub fn free(&self, node: &str) -> usize {
        self.nodes
            .get(node)
            .map_or(0, |d| d.iter().filter(|x| x.is_none()).count())
    }
}

fn held_by(devs: &[Option<String>], pod: &str) -> Vec<u32> {
    (0..devs.len() as u32)
        .filter(|&i| devs[i as usize].as_deref() == Some(pod))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the sequence of allocations and releases: no device has two holders, a pod
        /// gets exactly what it asked or an error, and free counts add up.
        #[test]
        fn exclusive_and_conserved(ops in proptest::collection::vec((0u8..6, 0usize..4, any::<bool>()), 1..60)) {
            let mut a = GpuAllocator::new([("n", 4)]);
            let mut holding: BTreeMap<String, usize> = BTreeMap::new();
            for (pod, want, release) in ops {
                let pod = format!("p{pod}");
                if release {
                    a.release(&pod);
                    holding.remove(&pod);
                } else {
                    let free = a.free("n");
                    match a.allocate("n", &pod, want) {
                        Ok(d) => {
                            let expect = *holding.entry(pod.clone()).or_insert(d.len());
                            prop_assert_eq!(d.len(), expect);
                        }
                        Err(GpuError::Insufficient { free: f, .. }) => {
                            prop_assert!(f < want);
                            prop_assert_eq!(f, free);
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                holding.retain(|_, n| *n > 0);
                let used: usize = holding.values().sum();
                prop_assert_eq!(a.free("n"), 4 - used);
            }
        }
    }

    #[test]
    fn distinct_devices_and_errors() {
        let mut a = GpuAllocator::new([("n", 2)]);
        assert_eq!(a.allocate("n", "x", 1).unwrap(), vec![0]);
        assert_eq!(a.allocate("n", "y", 1).unwrap(), vec![1]);
        assert_eq!(a.allocate("n", "x", 1).unwrap(), vec![0]);
        assert!(matches!(
            a.allocate("n", "z", 1),
            Err(GpuError::Insufficient { .. })
        ));
        a.release("x");
        assert_eq!(a.allocate("n", "z", 1).unwrap(), vec![0]);
        assert_eq!(
            a.allocate("m", "z", 1),
            Err(GpuError::UnknownNode("m".into()))
        );
    }
}
