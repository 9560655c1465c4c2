//! Sharing a cluster between job types: the workers each job type's policy wants,
//! fitted under `max_workers_total`, by priority.
//!
//! Pure, like the policy: the tick passes in every job type's spawn request and the
//! room left under the total cap, and gets back how many each may spawn and, for those
//! held back, why. When the cap binds, the highest priority with rows waiting goes
//! first; job types of equal priority take turns, one worker at a time, those with
//! the most rows waiting first. A job type that asks for nothing leaves the room to the
//! others, so a low-priority one still gets workers while the higher ones have nothing
//! waiting.

use std::fmt;

/// What one job type's policy asked for this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub job_type: String,
    pub priority: u32,
    /// Workers the policy decided to spawn.
    pub wanted: u32,
    /// Rows waiting: who goes first among equals.
    pub waiting: u64,
}

/// Why a job type got fewer workers than its policy wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// `max_workers_total` is reached by job types of the same priority or lower.
    Cap { total: u32 },
    /// The room went to job types of higher priority.
    Priority { to: Vec<String> },
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Held::Cap { total } => write!(f, "max_workers_total {total} reached"),
            Held::Priority { to } => write!(f, "room given to higher priority: {}", to.join(", ")),
        }
    }
}

/// What one job type may spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub job_type: String,
    pub spawn: u32,
    pub held: Option<Held>,
}

/// Fits `requests` into `room` workers (`None`: no total cap) under a cap of `total`.
pub fn share(requests: &[Request], room: Option<u32>, total: u32) -> Vec<Grant> {
    let Some(mut room) = room else {
        return requests
            .iter()
            .map(|r| Grant {
                job_type: r.job_type.clone(),
                spawn: r.wanted,
                held: None,
            })
            .collect();
    };
    let mut order: Vec<usize> = (0..requests.len()).collect();
    // Highest priority first; among equals, most rows waiting first, then by name so
    // the outcome never depends on the order the requests came in.
    order.sort_by(|&a, &b| {
        let (a, b) = (&requests[a], &requests[b]);
        b.priority
            .cmp(&a.priority)
            .then(b.waiting.cmp(&a.waiting))
            .then(a.job_type.cmp(&b.job_type))
    });
    let mut granted = vec![0u32; requests.len()];
    let mut start = 0;
    while start < order.len() {
        let priority = requests[order[start]].priority;
        let end = order[start..]
            .iter()
            .position(|&i| requests[i].priority != priority)
            .map_or(order.len(), |n| start + n);
        let group = &order[start..end];
        // Round robin within the group, a worker at a time.
        let mut gave = true;
        while room > 0 && gave {
            gave = false;
            for &i in group {
                if room > 0 && granted[i] < requests[i].wanted {
                    granted[i] += 1;
                    room -= 1;
                    gave = true;
                }
            }
        }
        start = end;
    }
    requests
        .iter()
        .enumerate()
        .map(|(i, request)| {
            let held = (granted[i] < request.wanted).then(|| {
                let to: Vec<String> = requests
                    .iter()
                    .enumerate()
                    .filter(|(j, other)| other.priority > request.priority && granted[*j] > 0)
                    .map(|(_, other)| other.job_type.clone())
                    .collect();
                if to.is_empty() {
                    Held::Cap { total }
                } else {
                    Held::Priority { to }
                }
            });
            Grant {
                job_type: request.job_type.clone(),
                spawn: granted[i],
                held,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(job_type: &str, priority: u32, wanted: u32, waiting: u64) -> Request {
        Request {
            job_type: job_type.into(),
            priority,
            wanted,
            waiting,
        }
    }

    fn spawns(grants: &[Grant]) -> Vec<(&str, u32)> {
        grants
            .iter()
            .map(|g| (g.job_type.as_str(), g.spawn))
            .collect()
    }

    #[test]
    fn without_a_total_cap_everyone_gets_what_its_policy_wants() {
        let requests = [request("a", 0, 5, 100), request("b", 9, 3, 10)];
        let grants = share(&requests, None, 0);
        assert_eq!(spawns(&grants), [("a", 5), ("b", 3)]);
        assert!(grants.iter().all(|g| g.held.is_none()));
    }

    #[test]
    fn when_the_cap_binds_the_highest_priority_goes_first() {
        let requests = [request("batch", 1, 5, 10_000), request("urgent", 5, 5, 50)];
        let grants = share(&requests, Some(6), 20);
        assert_eq!(spawns(&grants), [("batch", 1), ("urgent", 5)]);
        assert_eq!(
            grants[0].held,
            Some(Held::Priority {
                to: vec!["urgent".into()]
            })
        );
        assert_eq!(grants[1].held, None);
    }

    #[test]
    fn equal_priorities_share_the_room_in_turn_most_waiting_first() {
        let requests = [
            request("a", 1, 5, 100),
            request("b", 1, 5, 900),
            request("c", 1, 5, 500),
        ];
        let grants = share(&requests, Some(7), 7);
        assert_eq!(spawns(&grants), [("a", 2), ("b", 3), ("c", 2)]);
        assert!(
            grants
                .iter()
                .all(|g| g.held == Some(Held::Cap { total: 7 }))
        );
        // The order requests arrive in changes nothing.
        let mut reversed = requests.to_vec();
        reversed.reverse();
        let grants = share(&reversed, Some(7), 7);
        let mut again = spawns(&grants);
        again.sort();
        assert_eq!(again, [("a", 2), ("b", 3), ("c", 2)]);
    }

    #[test]
    fn a_low_priority_job_type_gets_workers_when_the_higher_ones_have_nothing_waiting() {
        // The urgent job type's policy asks for nothing: its queue is empty.
        let requests = [request("batch", 0, 5, 10_000), request("urgent", 9, 0, 0)];
        let grants = share(&requests, Some(3), 10);
        assert_eq!(spawns(&grants), [("batch", 3), ("urgent", 0)]);
        assert_eq!(grants[0].held, Some(Held::Cap { total: 10 }));
        assert_eq!(grants[1].held, None);
    }

    #[test]
    fn no_room_grants_nothing_and_says_why() {
        let grants = share(&[request("a", 0, 2, 50)], Some(0), 4);
        assert_eq!(spawns(&grants), [("a", 0)]);
        assert_eq!(
            grants[0].held.as_ref().map(ToString::to_string).as_deref(),
            Some("max_workers_total 4 reached")
        );
    }
}
