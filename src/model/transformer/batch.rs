//! Positions, attention mask and per-sequence experts of one forward call.

use super::*;

impl Batch {
    /// For left-padded sequences: `pad[b]` pads in front of sequence `b`, `past` positions already
    /// cached (with the same padding), `time` new positions.
    pub fn left_padded(pad: &[usize], past: usize, time: usize, device: &Device) -> Result<Self> {
        let gaps: Vec<Range<usize>> = pad.iter().map(|&p| 0..p).collect();
        Self::with_gaps(&gaps, past, time, device)
    }

    /// For sequences padded anywhere: positions `gaps[b]` of row `b` (cached or new) are padding,
    /// which no token attends to and which rotary positions skip. A shared prefix computed once
    /// and then followed by left-padded own parts has its padding after the prefix.
    pub fn with_gaps(
        gaps: &[Range<usize>],
        past: usize,
        time: usize,
        device: &Device,
    ) -> Result<Self> {
        let total = past + time;
        let mut positions = Vec::with_capacity(gaps.len() * time);
        let mut key_positions = Vec::with_capacity(gaps.len() * total);
        let mut mask = Vec::with_capacity(gaps.len() * time * total);
        for gap in gaps {
            // Padding takes the position of what follows it, so it is not counted.
            let position = |abs: usize| match abs >= gap.end {
                true => abs - gap.len(),
                false => abs.min(gap.start),
            };
            key_positions.extend((0..total).map(|j| position(j) as u32));
            for i in 0..time {
                let abs = past + i;
                positions.push(position(abs) as u32);
                for j in 0..total {
                    // A pad query may attend to itself only, so its softmax row stays finite.
                    let allowed = j <= abs && (!gap.contains(&j) || j == abs);
                    mask.push(if allowed { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let b = gaps.len();
        Ok(Self {
            positions: Tensor::from_vec(positions, (b, time), device)?,
            mask: Tensor::from_vec(mask, (b, 1, time, total), device)?,
            key_positions: Tensor::from_vec(key_positions, (b, total), device)?,
            experts: None,
        })
    }

    /// This batch with sequence `b` answered by expert `experts[b]` of the model's table.
    pub fn with_experts(self, experts: &[u32]) -> Result<Self> {
        let device = self.positions.device().clone();
        Ok(Self {
            experts: Some(Tensor::new(experts, &device)?),
            ..self
        })
    }
}
