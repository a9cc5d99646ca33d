/* Socket helpers for lossympi's Cython core: control-message handling for UDP GSO/GRO, clocks and
 * addresses. Kept in C because the CMSG_* macros have no Cython spelling. Linux only. */
#ifndef LM_NET_H
#define LM_NET_H

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

#define LM_CTRL_BYTES 64

typedef struct sockaddr_in lm_addr;

static inline int lm_errno(void) { return errno; }

static inline uint64_t lm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline void lm_sleep_ns(uint64_t ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(ns / 1000000000ULL);
    ts.tv_nsec = (long)(ns % 1000000000ULL);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline int lm_wait_writable(int fd, int timeout_ms) {
    struct pollfd p;
    p.fd = fd;
    p.events = POLLOUT;
    p.revents = 0;
    return poll(&p, 1, timeout_ms);
}

static inline void lm_addr_set(lm_addr *a, uint32_t ip_be, uint16_t port) {
    memset(a, 0, sizeof(*a));
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = ip_be;
    a->sin_port = htons(port);
}

static inline int lm_addr_eq(const lm_addr *a, const lm_addr *b) {
    return a->sin_family == b->sin_family && a->sin_addr.s_addr == b->sin_addr.s_addr &&
           a->sin_port == b->sin_port;
}

/* Attach a UDP_SEGMENT control message (GSO segment size) to msg, using ctrl (LM_CTRL_BYTES). */
static inline void lm_msg_set_gso(struct msghdr *m, char *ctrl, uint16_t gso_size) {
    struct cmsghdr *c;
    memset(ctrl, 0, LM_CTRL_BYTES);
    m->msg_control = ctrl;
    m->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
    c = CMSG_FIRSTHDR(m);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(c), &gso_size, sizeof(uint16_t));
}

/* Segment size reported by UDP_GRO for a received (possibly coalesced) buffer, or 0. */
static inline int lm_msg_gro_size(struct msghdr *m) {
    struct cmsghdr *c;
    int v = 0;
    if (m->msg_controllen == 0) return 0;
    for (c = CMSG_FIRSTHDR(m); c != NULL; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
            memcpy(&v, CMSG_DATA(c), sizeof(int));
            return v;
        }
    }
    return 0;
}

static inline uint16_t lm_ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t lm_ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t lm_ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void lm_st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void lm_st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void lm_st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* A sender's credit (receiver-driven ingest, docs/protocol.md "Incast"): the receive path raises it, the sending
 * thread waits on it. The grant is a 32-bit chunk count, so it is its own futex word. */
static inline uint32_t lm_grant_load(uint32_t *g) { return __atomic_load_n(g, __ATOMIC_ACQUIRE); }
static inline void lm_grant_store(uint32_t *g, uint32_t v) { __atomic_store_n(g, v, __ATOMIC_RELEASE); }
/* Raise *g to v if lower; wake a sender waiting on it. Returns 1 if it rose. */
static inline int lm_grant_raise(uint32_t *g, uint32_t v) {
    uint32_t old = __atomic_load_n(g, __ATOMIC_ACQUIRE);
    while (old < v) {
        if (__atomic_compare_exchange_n(g, &old, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            syscall(SYS_futex, g, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
            return 1;
        }
    }
    return 0;
}
/* Sleep while *g == seen, at most timeout_ns (a wake, a signal or a changed value ends it early). */
static inline void lm_grant_wait(uint32_t *g, uint32_t seen, uint64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    syscall(SYS_futex, g, FUTEX_WAIT_PRIVATE, seen, &ts, NULL, 0);
}

#endif
