/* The NFQUEUE delay line's hot loop (lossympi._nfqueue): read packet ids from a netfilter queue's netlink
 * socket with recvmmsg, hold each verdict until its due time, and send the verdicts back in batches.
 *
 * The socket is bound and configured by Python (copy mode "meta": only ids and metadata travel). Each packet's
 * due time is its arrival (CLOCK_MONOTONIC, read once per recvmmsg batch) plus the delay, plus a uniform jitter
 * in [-jitter, +jitter] as netem draws it. Two queues:
 *   - FIFO (no jitter, or jitter that keeps order): due times never decrease (a packet's due time is at least the
 *     one ahead of it), so every due packet is released by one NFQNL_MSG_VERDICT_BATCH naming the newest due id;
 *   - heap (jitter that reorders, as netem's tfifo does): a min-heap on (due, arrival order), one
 *     NFQNL_MSG_VERDICT per packet, all of a round concatenated into one send.
 * A packet's arrival is the kernel's receive stamp (NFQA_TIMESTAMP, CLOCK_REALTIME in microseconds, present
 * when receive timestamps are on: the Python side enables them) when it has one, else the time it is read: so the
 * time the line takes to wake up is not added to the delay. The line wakes `spin_ns` before a release is due and
 * polls the socket until then, so the timer's wake-up latency is not added either.
 * Gilbert-Elliott loss (netem's "loss gemodel p r 1-h 1-k") drops by verdict (NF_DROP) on arrival. netem's
 * "reorder" probability sends a packet at once (its own accept verdict).
 * Kept in C for the netlink structs; the loop runs without the GIL. Linux only. */
#ifndef LM_NFQ_H
#define LM_NFQ_H

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>

#define LM_NFQ_SUBSYS_QUEUE 3
#define LM_NFQ_MSG_PACKET 0
#define LM_NFQ_MSG_VERDICT 1
#define LM_NFQ_MSG_VERDICT_BATCH 3
#define LM_NFQA_PACKET_HDR 1
#define LM_NFQA_VERDICT_HDR 2
#define LM_NFQA_TIMESTAMP 4
#define LM_NF_DROP 0
#define LM_NF_ACCEPT 1
#define LM_NLMSG_ERROR 2
#define LM_NLM_F_REQUEST 1
#define LM_NFQ_VERDICT_LEN 32 /* nlmsghdr 16 + nfgenmsg 4 + nlattr 4 + verdict hdr 8 */
#define LM_NFQ_TX_BYTES 65536
#define LM_NFQ_RX_BYTES 2048

typedef struct {
    uint64_t due;
    uint64_t seq;
    uint32_t id;
} lm_nfq_pkt;

typedef struct {
    int fd;
    uint16_t queue;
    uint64_t delay_ns, jitter_ns;
    int heap_mode;           /* jitter that may reorder */
    double reorder_p;        /* netem "reorder": probability of sending at once */
    int ge_on, ge_bad;       /* Gilbert-Elliott loss on, current state */
    double ge_p, ge_r, ge_loss_bad, ge_loss_good;
    uint64_t rng[4];
    lm_nfq_pkt *pkts;        /* FIFO ring (head, count) or binary heap (count) */
    uint32_t cap, head, count;
    uint64_t seq, last_due;
    uint64_t spin_ns;        /* poll instead of sleeping when a release is this close */
    int64_t real_offset;     /* CLOCK_REALTIME - CLOCK_MONOTONIC, refreshed per batch */
    uint32_t last_id;
    int have_last, strays;
    struct mmsghdr *msgs;
    struct iovec *iov;
    char *rx;
    unsigned vlen;
    char *tx;
    size_t txlen;
    uint32_t nlseq;
    /* counters */
    uint64_t received, accepted, dropped_ge, immediate, enobufs, truncated, nl_errors, overflow;
    uint64_t batch_verdicts, single_verdicts, sends, send_errors, recv_calls, polls, stamped;
    int last_nl_error;
} lm_nfq;

static inline uint64_t lm_nfq_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline int64_t lm_nfq_real_offset(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t real = (int64_t)ts.tv_sec * 1000000000LL + (int64_t)ts.tv_nsec;
    return real - (int64_t)lm_nfq_now();
}

/* xoshiro256** (Blackman and Vigna), seeded by splitmix64. */
static inline uint64_t lm_nfq_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t lm_nfq_next(lm_nfq *q) {
    uint64_t *s = q->rng;
    uint64_t result = lm_nfq_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = lm_nfq_rotl(s[3], 45);
    return result;
}

static inline double lm_nfq_uniform(lm_nfq *q) { return (double)(lm_nfq_next(q) >> 11) * 0x1.0p-53; }

static void lm_nfq_seed(lm_nfq *q, uint64_t seed) {
    for (int i = 0; i < 4; i++) {
        uint64_t z = (seed += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        q->rng[i] = z ^ (z >> 31);
    }
}

static void lm_nfq_free(lm_nfq *q) {
    free(q->pkts);
    free(q->msgs);
    free(q->iov);
    free(q->rx);
    free(q->tx);
    q->pkts = NULL;
    q->msgs = NULL;
    q->iov = NULL;
    q->rx = NULL;
    q->tx = NULL;
}

/* 0, or -ENOMEM. The other fields (delay, jitter, modes, GE) are set by the caller before running. */
static int lm_nfq_init(lm_nfq *q, int fd, uint16_t queue, uint32_t capacity, unsigned vlen, uint64_t seed) {
    memset(q, 0, sizeof(*q));
    q->fd = fd;
    q->queue = queue;
    q->cap = capacity;
    q->vlen = vlen;
    q->pkts = calloc(capacity, sizeof(lm_nfq_pkt));
    q->msgs = calloc(vlen, sizeof(struct mmsghdr));
    q->iov = calloc(vlen, sizeof(struct iovec));
    q->rx = malloc((size_t)vlen * LM_NFQ_RX_BYTES);
    q->tx = malloc(LM_NFQ_TX_BYTES);
    if (!q->pkts || !q->msgs || !q->iov || !q->rx || !q->tx) {
        lm_nfq_free(q);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < vlen; i++) {
        q->iov[i].iov_base = q->rx + (size_t)i * LM_NFQ_RX_BYTES;
        q->iov[i].iov_len = LM_NFQ_RX_BYTES;
        q->msgs[i].msg_hdr.msg_iov = &q->iov[i];
        q->msgs[i].msg_hdr.msg_iovlen = 1;
    }
    lm_nfq_seed(q, seed);
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); /* wake-ups on time, not 50 us late */
    return 0;
}

static void lm_nfq_flush(lm_nfq *q) {
    if (q->txlen == 0)
        return;
    ssize_t n;
    do {
        n = send(q->fd, q->tx, q->txlen, 0);
    } while (n < 0 && errno == EINTR);
    q->sends++;
    if (n < 0)
        q->send_errors++;
    q->txlen = 0;
}

static void lm_nfq_verdict(lm_nfq *q, int batch, uint32_t verdict, uint32_t id) {
    if (q->txlen + LM_NFQ_VERDICT_LEN > LM_NFQ_TX_BYTES)
        lm_nfq_flush(q);
    char *m = q->tx + q->txlen;
    uint32_t len = LM_NFQ_VERDICT_LEN, seq = ++q->nlseq, pid = 0, v = htonl(verdict), i = htonl(id);
    uint16_t type = (uint16_t)((LM_NFQ_SUBSYS_QUEUE << 8) | (batch ? LM_NFQ_MSG_VERDICT_BATCH : LM_NFQ_MSG_VERDICT));
    uint16_t flags = LM_NLM_F_REQUEST, res = htons(q->queue), alen = 12, atype = LM_NFQA_VERDICT_HDR;
    memcpy(m, &len, 4);
    memcpy(m + 4, &type, 2);
    memcpy(m + 6, &flags, 2);
    memcpy(m + 8, &seq, 4);
    memcpy(m + 12, &pid, 4);
    m[16] = 0; /* nfgen_family AF_UNSPEC */
    m[17] = 0; /* NFNETLINK_V0 */
    memcpy(m + 18, &res, 2);
    memcpy(m + 20, &alen, 2);
    memcpy(m + 22, &atype, 2);
    memcpy(m + 24, &v, 4);
    memcpy(m + 28, &i, 4);
    q->txlen += LM_NFQ_VERDICT_LEN;
    if (batch)
        q->batch_verdicts++;
    else
        q->single_verdicts++;
}

static inline int lm_nfq_before(const lm_nfq_pkt *a, const lm_nfq_pkt *b) {
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void lm_nfq_heap_push(lm_nfq *q, lm_nfq_pkt p) {
    uint32_t i = q->count++;
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (!lm_nfq_before(&p, &q->pkts[parent]))
            break;
        q->pkts[i] = q->pkts[parent];
        i = parent;
    }
    q->pkts[i] = p;
}

static void lm_nfq_heap_pop(lm_nfq *q) {
    lm_nfq_pkt last = q->pkts[--q->count];
    uint32_t i = 0, n = q->count;
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && lm_nfq_before(&q->pkts[c + 1], &q->pkts[c]))
            c++;
        if (!lm_nfq_before(&q->pkts[c], &last))
            break;
        q->pkts[i] = q->pkts[c];
        i = c;
    }
    if (n > 0)
        q->pkts[i] = last;
}

/* Gilbert-Elliott as netem: move between the states first, then lose with the new state's probability. */
static int lm_nfq_ge_drop(lm_nfq *q) {
    if (q->ge_bad) {
        if (lm_nfq_uniform(q) < q->ge_r)
            q->ge_bad = 0;
    } else if (lm_nfq_uniform(q) < q->ge_p) {
        q->ge_bad = 1;
    }
    return lm_nfq_uniform(q) < (q->ge_bad ? q->ge_loss_bad : q->ge_loss_good);
}

static void lm_nfq_arrive(lm_nfq *q, uint32_t id, uint64_t now) {
    q->received++;
    q->last_id = id;
    q->have_last = 1;
    if (q->ge_on && lm_nfq_ge_drop(q)) {
        q->dropped_ge++;
        lm_nfq_verdict(q, 0, LM_NF_DROP, id);
        return;
    }
    if ((q->reorder_p > 0 && lm_nfq_uniform(q) < q->reorder_p) || q->count >= q->cap) {
        if (q->count >= q->cap)
            q->overflow++;
        else
            q->immediate++;
        q->accepted++;
        lm_nfq_verdict(q, 0, LM_NF_ACCEPT, id);
        return;
    }
    uint64_t due = now + q->delay_ns;
    if (q->jitter_ns > 0) {
        double offset = (2.0 * lm_nfq_uniform(q) - 1.0) * (double)q->jitter_ns;
        due = (offset < 0 && (uint64_t)(-offset) > due - now) ? now : due + (int64_t)offset;
    }
    lm_nfq_pkt p = {due, q->seq++, id};
    if (q->heap_mode) {
        lm_nfq_heap_push(q, p);
        return;
    }
    if (p.due < q->last_due)
        p.due = q->last_due; /* never before the packet ahead of it */
    q->last_due = p.due;
    q->pkts[(q->head + q->count) % q->cap] = p;
    q->count++;
}

/* Parse one netlink datagram (one or more messages). */
static void lm_nfq_parse(lm_nfq *q, const char *buf, size_t len, uint64_t now) {
    size_t off = 0;
    while (off + 16 <= len) {
        uint32_t mlen;
        uint16_t type;
        memcpy(&mlen, buf + off, 4);
        memcpy(&type, buf + off + 4, 2);
        if (mlen < 16 || off + mlen > len)
            break;
        if (type == ((LM_NFQ_SUBSYS_QUEUE << 8) | LM_NFQ_MSG_PACKET)) {
            size_t a = off + 20; /* after nlmsghdr and nfgenmsg */
            uint32_t id = 0;
            int have_id = 0;
            uint64_t arrival = now;
            while (a + 4 <= off + mlen) {
                uint16_t alen, atype;
                memcpy(&alen, buf + a, 2);
                memcpy(&atype, buf + a + 2, 2);
                if (alen < 4 || a + alen > off + mlen)
                    break;
                if ((atype & 0x3fff) == LM_NFQA_PACKET_HDR && alen >= 8) {
                    memcpy(&id, buf + a + 4, 4);
                    id = ntohl(id);
                    have_id = 1;
                } else if ((atype & 0x3fff) == LM_NFQA_TIMESTAMP && alen >= 20) {
                    uint64_t sec, usec;
                    memcpy(&sec, buf + a + 4, 8);
                    memcpy(&usec, buf + a + 12, 8);
                    int64_t stamp = (int64_t)(be64toh(sec) * 1000000000ULL + be64toh(usec) * 1000ULL) - q->real_offset;
                    if (stamp > 0 && (uint64_t)stamp <= now && now - (uint64_t)stamp < 1000000000ULL) {
                        arrival = (uint64_t)stamp; /* the kernel's receive stamp, if sane (within 1 s) */
                        q->stamped++;
                    }
                }
                a += (alen + 3u) & ~3u;
            }
            if (have_id)
                lm_nfq_arrive(q, id, arrival);
        } else if (type == LM_NLMSG_ERROR && mlen >= 20) {
            int32_t err;
            memcpy(&err, buf + off + 16, 4);
            if (err != 0) {
                q->nl_errors++;
                q->last_nl_error = -err;
            }
        }
        off += (mlen + 3u) & ~3u;
    }
}

/* Release every packet due at `now`. */
static void lm_nfq_release(lm_nfq *q, uint64_t now) {
    if (q->heap_mode) {
        while (q->count > 0 && q->pkts[0].due <= now) {
            lm_nfq_verdict(q, 0, LM_NF_ACCEPT, q->pkts[0].id);
            q->accepted++;
            lm_nfq_heap_pop(q);
        }
        if (q->count == 0 && q->strays && q->have_last) { /* ids lost to ENOBUFS: release them when idle */
            lm_nfq_verdict(q, 1, LM_NF_ACCEPT, q->last_id);
            q->strays = 0;
        }
        return;
    }
    uint32_t newest = 0, n = 0;
    while (q->count > 0 && q->pkts[q->head].due <= now) {
        newest = q->pkts[q->head].id;
        q->head = (q->head + 1) % q->cap;
        q->count--;
        n++;
    }
    if (n > 0) {
        lm_nfq_verdict(q, 1, LM_NF_ACCEPT, newest); /* every id up to the newest due one */
        q->accepted += n;
    } else if (q->count == 0 && q->strays && q->have_last) {
        lm_nfq_verdict(q, 1, LM_NF_ACCEPT, q->last_id);
    }
    if (q->count == 0)
        q->strays = 0;
}

static inline uint64_t lm_nfq_next_due(const lm_nfq *q) {
    return q->heap_mode ? q->pkts[0].due : q->pkts[q->head].due;
}

/* Run until `until` (CLOCK_MONOTONIC ns) or a socket error: 0, or -errno. */
static int lm_nfq_run(lm_nfq *q, uint64_t until) {
    struct pollfd pfd;
    pfd.fd = q->fd;
    pfd.events = POLLIN;
    for (;;) {
        uint64_t now = lm_nfq_now();
        lm_nfq_release(q, now);
        lm_nfq_flush(q);
        if (now >= until)
            return 0;
        for (unsigned i = 0; i < q->vlen; i++)
            q->msgs[i].msg_hdr.msg_flags = 0;
        int n = recvmmsg(q->fd, q->msgs, q->vlen, MSG_DONTWAIT, NULL);
        q->recv_calls++;
        if (n > 0) {
            q->real_offset = lm_nfq_real_offset();
            now = lm_nfq_now();
            for (int i = 0; i < n; i++) {
                if (q->msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
                    q->truncated++;
                lm_nfq_parse(q, q->rx + (size_t)i * LM_NFQ_RX_BYTES, q->msgs[i].msg_len, now);
            }
            continue;
        }
        if (n < 0 && errno == ENOBUFS) { /* the socket overflowed: the kernel lost packet messages */
            q->enobufs++;
            q->strays = 1;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return -errno;
        now = lm_nfq_now();
        uint64_t wake = until;
        if (q->count > 0 && lm_nfq_next_due(q) < wake)
            wake = lm_nfq_next_due(q);
        if (wake <= now + q->spin_ns && wake < until)
            continue; /* close to a release: poll the socket instead of sleeping */
        if (wake < until)
            wake -= q->spin_ns;
        if (wake <= now)
            continue;
        struct timespec ts;
        ts.tv_sec = (time_t)((wake - now) / 1000000000ULL);
        ts.tv_nsec = (long)((wake - now) % 1000000000ULL);
        q->polls++;
        ppoll(&pfd, 1, &ts, NULL);
    }
}

#endif
