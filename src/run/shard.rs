//! Shards: image i belongs to shard `i mod count`.

use anyhow::{Context, Result, bail};

/// Shard `index` of `count`: image i is this shard's when i mod count == index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// "I/N".
    pub fn parse(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard '{s}' is not I/N (e.g. 0/4) or auto"))?;
        let i: usize = i
            .trim()
            .parse()
            .with_context(|| format!("--shard '{s}': '{i}' is not a number"))?;
        let n: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard '{s}': '{n}' is not a number"))?;
        Self::new(i, n)
    }

    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            bail!("the shard count must be at least 1");
        }
        if index >= count {
            bail!("shard index {index} is not below the shard count {count} (shards count from 0)");
        }
        Ok(Self { index, count })
    }

    /// `--shard auto`: a Slurm array task (SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT,
    /// or _MIN/_MAX), else a Kubernetes Indexed Job (JOB_COMPLETION_INDEX with `count`,
    /// from `--shard-count`). `env` looks variables up (std::env::var in real use).
    pub fn auto(env: &dyn Fn(&str) -> Option<String>, count: Option<usize>) -> Result<Self> {
        let num = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .with_context(|| format!("{name}='{v}' is not a number")),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let n = match (
                count,
                num("SLURM_ARRAY_TASK_COUNT")?,
                num("SLURM_ARRAY_TASK_MAX")?,
            ) {
                (Some(c), _, _) => c,
                (None, _, Some(max)) => max
                    .checked_sub(min)
                    .map(|d| d + 1)
                    .context("SLURM_ARRAY_TASK_MAX is below SLURM_ARRAY_TASK_MIN")?,
                (None, Some(c), None) => c,
                (None, None, None) => bail!(
                    "--shard auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT \
                     nor SLURM_ARRAY_TASK_MAX is; pass --shard-count"
                ),
            };
            let i = id.checked_sub(min).with_context(|| {
                format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
            })?;
            return Self::new(i, n).context("--shard auto (Slurm array)");
        }
        if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            let n = count.context(
                "--shard auto: JOB_COMPLETION_INDEX is set (Kubernetes Indexed Job); pass \
                 --shard-count with the Job's completions",
            )?;
            return Self::new(i, n).context("--shard auto (Kubernetes Indexed Job)");
        }
        bail!(
            "--shard auto found no shard in the environment (SLURM_ARRAY_TASK_ID or \
             JOB_COMPLETION_INDEX); use --shard I/N"
        )
    }

    pub fn selects(&self, index: usize) -> bool {
        index % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_and_read_the_environment() {
        let s = Shard::parse("1/3").unwrap();
        let mine: Vec<usize> = (0..10).filter(|&i| s.selects(i)).collect();
        assert_eq!(mine, [1, 4, 7]);
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("0/0").is_err());
        assert!(Shard::parse("x").is_err());
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            Shard::auto(&slurm, None).unwrap(),
            Shard { index: 2, count: 4 }
        );
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "8"),
        ]);
        assert_eq!(
            Shard::auto(&slurm, None).unwrap(),
            Shard { index: 4, count: 8 }
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            Shard::auto(&k8s, Some(5)).unwrap(),
            Shard { index: 3, count: 5 }
        );
        assert!(Shard::auto(&k8s, None).is_err());
        assert!(Shard::auto(&env(&[]), Some(2)).is_err());
    }
}
