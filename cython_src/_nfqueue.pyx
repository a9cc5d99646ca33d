# cython: language_level=3
"""The NFQUEUE delay line's hot loop: hold each packet's verdict for its delay, without the GIL.

Python (:mod:`lossympi.netem.delayline`) opens and configures the netfilter queue's netlink socket (copy mode
"meta"); :class:`DelayLine` reads the packet ids with ``recvmmsg`` and sends the verdicts back: one
``NFQNL_MSG_VERDICT_BATCH`` per round for an in-order line, one ``NFQNL_MSG_VERDICT`` per packet when jitter
reorders. The C code is ``lm_nfq.h``.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "lm_nfq.h" nogil:
    ctypedef struct lm_nfq:
        uint64_t delay_ns, jitter_ns
        int heap_mode
        double reorder_p
        int ge_on
        double ge_p, ge_r, ge_loss_bad, ge_loss_good
        uint32_t count
        uint64_t received, accepted, dropped_ge, immediate, enobufs, truncated, nl_errors, overflow
        uint64_t batch_verdicts, single_verdicts, sends, send_errors, recv_calls, polls, stamped
        uint64_t spin_ns
        int last_nl_error
    int lm_nfq_init(lm_nfq *q, int fd, uint16_t queue, uint32_t capacity, unsigned vlen, uint64_t seed)
    void lm_nfq_free(lm_nfq *q)
    int lm_nfq_run(lm_nfq *q, uint64_t until)
    uint64_t lm_nfq_now()


_COUNTERS = ("received", "accepted", "dropped_ge", "immediate", "enobufs", "truncated", "nl_errors", "overflow",
             "batch_verdicts", "single_verdicts", "sends", "send_errors", "recv_calls", "polls", "stamped")


cdef class DelayLine:
    """Hold the verdicts of one netfilter queue's packets for ``delay`` (+- ``jitter``) seconds.

    Parameters
    ----------
    fd : int
        The netlink socket, bound to the queue and in copy mode "meta" (the caller keeps it open).
    queue : int
        The queue number (``iptables -j NFQUEUE --queue-num``).
    delay, jitter : float
        Seconds; each packet is due at its arrival + ``delay`` + U(-``jitter``, ``jitter``) (netem's uniform
        jitter), and never before its arrival.
    jitter_reorders : bool
        True: packets leave in the order of their due times (netem's tfifo, so jitter reorders). False: a packet is
        never released before the one ahead of it (due = max(own, previous due)).
    reorder : float
        netem's ``reorder``: probability that a packet is released at once, ahead of those held.
    gemodel : tuple or None
        ``(p, r, loss_bad, loss_good)``: Gilbert-Elliott loss, netem's ``loss gemodel p r 1-h 1-k`` (move good ->
        bad with probability p and bad -> good with r, then lose with the new state's probability).
    capacity : int
        Packets held at most (at least the kernel queue's length); beyond it packets pass at once (``overflow``).
    seed : int
        Seed of the generator (jitter, reorder, loss).
    vlen : int
        Netlink messages read per ``recvmmsg``.
    spin : float
        Seconds before a release when the line stops sleeping and polls the socket instead, so that the timer's
        wake-up latency is not added to the delay (CPU spent: at most ``spin`` per release).
    """

    cdef lm_nfq q
    cdef bint ready

    def __cinit__(self, int fd, int queue, double delay, double jitter=0.0, bint jitter_reorders=True,
                  double reorder=0.0, object gemodel=None, unsigned int capacity=1 << 17,
                  unsigned long long seed=0, unsigned int vlen=64, double spin=50e-6):
        self.ready = False
        if not 0 <= queue <= 65535:
            raise ValueError(f"queue must be in [0, 65535], got {queue}")
        if not (delay >= 0 and jitter >= 0 and 0 <= reorder <= 1):
            raise ValueError("delay and jitter must be >= 0 seconds and reorder a probability")
        if capacity < 1 or vlen < 1:
            raise ValueError("capacity and vlen must be positive")
        rc = lm_nfq_init(&self.q, fd, <uint16_t>queue, capacity, vlen, seed)
        if rc != 0:
            raise MemoryError("cannot allocate the delay line's buffers")
        self.ready = True
        self.q.delay_ns = <uint64_t>(delay * 1e9 + 0.5)
        self.q.jitter_ns = <uint64_t>(jitter * 1e9 + 0.5)
        self.q.heap_mode = 1 if (jitter > 0 and jitter_reorders) else 0
        self.q.reorder_p = reorder
        self.q.spin_ns = <uint64_t>(max(spin, 0.0) * 1e9)
        if gemodel is not None:
            p, r, loss_bad, loss_good = (float(x) for x in gemodel)
            for value in (p, r, loss_bad, loss_good):
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"gemodel values must be probabilities, got {gemodel!r}")
            self.q.ge_on = 1
            self.q.ge_p, self.q.ge_r, self.q.ge_loss_bad, self.q.ge_loss_good = p, r, loss_bad, loss_good

    def __dealloc__(self):
        if self.ready:
            lm_nfq_free(&self.q)

    def run(self, double seconds):
        """Serve the queue for ``seconds`` (the GIL released), then return so the caller can check signals.

        Raises
        ------
        OSError
            The netlink socket failed (other than an overflow, which is counted as ``enobufs``).
        """
        cdef uint64_t until = lm_nfq_now() + <uint64_t>(max(seconds, 0.0) * 1e9)
        cdef int rc
        with nogil:
            rc = lm_nfq_run(&self.q, until)
        if rc < 0:
            raise OSError(-rc, "delay line: netlink socket failed")

    @property
    def held(self):
        """Packets whose verdict is being held now."""
        return self.q.count

    def stats(self):
        """Counters: ``received``, ``accepted``, ``dropped_ge`` (Gilbert-Elliott drops), ``immediate`` (netem
        reorder), ``enobufs`` (the socket overflowed: the kernel lost packet messages), ``truncated``,
        ``nl_errors`` (verdicts the kernel refused), ``overflow`` (passed at once: the line was full),
        ``batch_verdicts``, ``single_verdicts``, ``sends``, ``send_errors``, ``recv_calls``, ``polls``,
        ``stamped`` (arrivals taken from the kernel's receive stamp), ``held``."""
        values = (self.q.received, self.q.accepted, self.q.dropped_ge, self.q.immediate, self.q.enobufs,
                  self.q.truncated, self.q.nl_errors, self.q.overflow, self.q.batch_verdicts,
                  self.q.single_verdicts, self.q.sends, self.q.send_errors, self.q.recv_calls, self.q.polls,
                  self.q.stamped)
        out = dict(zip(_COUNTERS, values))
        out["held"] = self.q.count
        out["last_nl_error"] = self.q.last_nl_error
        return out
