//! Shards: image i belongs to shard `i mod count`.

use anyhow::{Context, Result, bail, ensure};

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

    /// `--shard auto`: a Slurm array task, else a Kubernetes Indexed Job (JOB_COMPLETION_INDEX
    /// with `count`, from `--shard-count`). `env` looks variables up (std::env::var in real
    /// use).
    ///
    /// A Slurm array `--array=MIN-MAX:STEP` runs the ids MIN, MIN+STEP, ... ≤ MAX, so task ID
    /// is shard (ID − MIN) / STEP of SLURM_ARRAY_TASK_COUNT (else (MAX − MIN) / STEP + 1).
    /// `count` may only repeat the array's own task count: another count would leave shards
    /// that no task runs, or tasks with no shard.
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
            return Self::slurm(id, &num, count).context("--shard auto (Slurm array)");
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

    fn slurm(
        id: usize,
        num: &dyn Fn(&str) -> Result<Option<usize>>,
        count: Option<usize>,
    ) -> Result<Self> {
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1);
        ensure!(step >= 1, "SLURM_ARRAY_TASK_STEP is 0");
        let offset = id.checked_sub(min).with_context(|| {
            format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
        })?;
        ensure!(
            offset % step == 0,
            "SLURM_ARRAY_TASK_ID {id} is not SLURM_ARRAY_TASK_MIN {min} plus a multiple of \
             SLURM_ARRAY_TASK_STEP {step}"
        );
        let index = offset / step;
        let max = num("SLURM_ARRAY_TASK_MAX")?;
        let from_max = match max {
            Some(max) => Some(
                max.checked_sub(min).with_context(|| {
                    format!("SLURM_ARRAY_TASK_MAX {max} is below SLURM_ARRAY_TASK_MIN {min}")
                })? / step
                    + 1,
            ),
            None => None,
        };
        let task_count = num("SLURM_ARRAY_TASK_COUNT")?;
        // A list array (--array=1,4,9) has a COUNT that no MIN-MAX:STEP range gives; its ids
        // do not map onto 0..COUNT, so some shards would never run.
        if let (Some(c), Some(r), Some(max)) = (task_count, from_max, max) {
            ensure!(
                c == r,
                "SLURM_ARRAY_TASK_COUNT {c} is not the {r} tasks of {min}-{max}:{step}; only a \
                 MIN-MAX:STEP array maps onto shards, use --shard I/N"
            );
        }
        let n = match (task_count.or(from_max), count) {
            // Another count would leave images that no task makes.
            (Some(n), Some(c)) if n != c => bail!(
                "--shard-count {c} differs from the array's {n} tasks; leave it out or make \
                 them agree"
            ),
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => bail!(
                "SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor \
                 SLURM_ARRAY_TASK_MAX is; pass --shard-count"
            ),
        };
        ensure!(
            index < n,
            "SLURM_ARRAY_TASK_ID {id} is task {index} of the array, but it has only {n} tasks"
        );
        Self::new(index, n)
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

    fn env(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }

    fn fixed(pairs: &[(&'static str, &str)]) -> impl Fn(&str) -> Option<String> {
        env(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    /// The environment Slurm gives task `id` of `--array=MIN-MAX:STEP`; `count` and `max`
    /// may be left out as older Slurm versions do.
    fn slurm(
        id: usize,
        min: usize,
        max: Option<usize>,
        step: Option<usize>,
        count: Option<usize>,
    ) -> impl Fn(&str) -> Option<String> {
        let mut v = vec![
            ("SLURM_ARRAY_TASK_ID", id.to_string()),
            ("SLURM_ARRAY_TASK_MIN", min.to_string()),
        ];
        let opt = [
            ("SLURM_ARRAY_TASK_MAX", max),
            ("SLURM_ARRAY_TASK_STEP", step),
            ("SLURM_ARRAY_TASK_COUNT", count),
        ];
        v.extend(
            opt.iter()
                .filter_map(|(k, x)| Some((*k, (*x)?.to_string()))),
        );
        env(v)
    }

    #[test]
    fn shards_partition_and_read_the_environment() {
        let s = Shard::parse("1/3").unwrap();
        let mine: Vec<usize> = (0..10).filter(|&i| s.selects(i)).collect();
        assert_eq!(mine, [1, 4, 7]);
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("0/0").is_err());
        assert!(Shard::parse("x").is_err());
        let s = fixed(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(Shard::auto(&s, None).unwrap(), Shard { index: 2, count: 4 });
        let s = fixed(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "8"),
        ]);
        assert_eq!(Shard::auto(&s, None).unwrap(), Shard { index: 4, count: 8 });
        let k8s = fixed(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            Shard::auto(&k8s, Some(5)).unwrap(),
            Shard { index: 3, count: 5 }
        );
        assert!(Shard::auto(&k8s, None).is_err());
        assert!(Shard::auto(&fixed(&[]), Some(2)).is_err());
    }

    #[test]
    fn stepped_and_offset_slurm_arrays() {
        // --array=0-9:3: ids 0, 3, 6, 9.
        let got: Vec<Shard> = [0, 3, 6, 9]
            .iter()
            .map(|&id| Shard::auto(&slurm(id, 0, Some(9), Some(3), Some(4)), None).unwrap())
            .collect();
        let want: Vec<Shard> = (0..4).map(|i| Shard::new(i, 4).unwrap()).collect();
        assert_eq!(got, want);
        // Without COUNT the count comes from MIN, MAX and STEP; 0-10:3 has the same ids.
        for max in [9, 10, 11] {
            let s = Shard::auto(&slurm(6, 0, Some(max), Some(3), None), None).unwrap();
            assert_eq!(s, Shard { index: 2, count: 4 }, "max {max}");
        }
        // --array=5-8: ids 5..=8.
        for id in 5..=8 {
            let s = Shard::auto(&slurm(id, 5, Some(8), Some(1), Some(4)), None).unwrap();
            assert_eq!(
                s,
                Shard {
                    index: id - 5,
                    count: 4
                }
            );
        }
        // --array=10-20:5 with a matching --shard-count.
        let s = Shard::auto(&slurm(15, 10, Some(20), Some(5), Some(3)), Some(3)).unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        // Slurm without COUNT or MAX: --shard-count gives the count.
        let s = Shard::auto(&slurm(7, 1, None, Some(2), None), Some(4)).unwrap();
        assert_eq!(s, Shard { index: 3, count: 4 });
    }

    #[test]
    fn bad_slurm_arrays_are_one_line_errors() {
        let err = |e: &dyn Fn(&str) -> Option<String>, c: Option<usize>| {
            let e = Shard::auto(e, c).expect_err("must fail");
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "{msg}");
            msg
        };
        // An id off the grid of 0-9:3.
        assert!(err(&slurm(4, 0, Some(9), Some(3), Some(4)), None).contains("multiple"));
        // An id past the end, and below MIN.
        assert!(err(&slurm(12, 0, Some(9), Some(3), Some(4)), None).contains("only 4 tasks"));
        assert!(err(&slurm(3, 5, Some(8), None, Some(4)), None).contains("below"));
        assert!(err(&slurm(2, 0, Some(9), Some(0), None), None).contains("STEP is 0"));
        assert!(err(&slurm(5, 5, Some(4), None, None), None).contains("MAX 4 is below"));
        // A list array (--array=1,4,9): COUNT 3 fits no range.
        assert!(err(&slurm(4, 1, Some(9), Some(1), Some(3)), None).contains("MIN-MAX:STEP"));
        // A --shard-count that is not the array's count would skip or wrap shards.
        assert!(err(&slurm(3, 0, Some(9), Some(3), Some(4)), Some(5)).contains("--shard-count"));
        assert!(err(&slurm(3, 0, Some(9), Some(3), Some(4)), Some(2)).contains("--shard-count"));
        assert!(err(&slurm(3, 0, None, Some(3), None), None).contains("--shard-count"));
        assert!(err(&slurm(9, 0, None, Some(3), None), Some(3)).contains("only 3 tasks"));
        let junk = fixed(&[("SLURM_ARRAY_TASK_ID", "x1")]);
        assert!(err(&junk, Some(2)).contains("SLURM_ARRAY_TASK_ID='x1'"));
    }

    /// Every task of an array takes a different shard of one count, so each job index is
    /// made by exactly one task.
    #[test]
    fn slurm_array_tasks_partition_the_jobs() {
        for (min, max, step) in [(0, 9, 3), (5, 8, 1), (1, 7, 2), (3, 3, 1), (2, 100, 7)] {
            let ids: Vec<usize> = (min..=max).step_by(step).collect();
            for (count, max) in [(Some(ids.len()), Some(max)), (None, Some(max))] {
                let shards: Vec<Shard> = ids
                    .iter()
                    .map(|&id| Shard::auto(&slurm(id, min, max, Some(step), count), None))
                    .collect::<Result<_>>()
                    .unwrap();
                for job in 0..200 {
                    let takers = shards.iter().filter(|s| s.selects(job)).count();
                    assert_eq!(takers, 1, "array {min}-{max:?}:{step}, job {job}");
                }
                assert!(shards.iter().all(|s| s.count == ids.len()));
            }
        }
    }
}
