//! The balancer fuzzer (issue 13, `xlb_tests::fuzz`): 200 000 random and mutated frames from a
//! fixed seed through BPF_PROG_TEST_RUN, every one checked. `cargo xtask fuzz --frames N
//! [--seed S]` runs longer ones. Needs root.

use xlb_tests::{fixture::in_fixture_netns, fuzz};

/// The seed of `cargo xtask test`: a failure here is replayed with `cargo xtask fuzz --seed 13`.
const SEED: u64 = 13;
const FRAMES: u64 = 200_000;

#[test]
fn two_hundred_thousand_frames_never_abort_and_are_each_counted_once() {
    in_fixture_netns(|ifindex| {
        let dp = fuzz::fuzz_balancer().expect("the balancer");
        let report =
            fuzz::run(&dp, ifindex, FRAMES, SEED, |_| {}).unwrap_or_else(|e| panic!("{e:#}"));
        println!("{}", report.summary(SEED));
        assert_eq!(report.frames, FRAMES);
        // The frames reach every part of the program: drops, passes and each kind of frame
        // sent on.
        assert!(report.actions.iter().take(3).all(|&n| n > 0), "{report:?}");
        assert!(report.forwarded.iter().all(|&n| n > 0), "{report:?}");
        for reason in [
            "drop_deny_list",
            "drop_src_denied",
            "drop_src_not_allowed",
            "fwd_icmp_frag_needed",
            "tx_icmp_echo_reply",
            "drop_fragment",
            "drop_malformed_l4",
            "pass_malformed",
            "pass_not_ip",
            "drop_ext_header",
            "pass_no_neigh",
            "drop_no_backend",
            "drop_no_route",
            "drop_rate_limited_src",
            "drop_rate_limited_vip",
        ] {
            assert!(
                report.reasons_seen.contains(reason),
                "no frame counted as {reason}: {:?}",
                report.reasons_seen
            );
        }
    });
}
