# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""lossympi._core: the datagram engine.

Sends numpy buffers as authenticated UDP datagrams (sendmmsg, optional UDP GSO), receives them
(recvmmsg, optional UDP GRO), validates every field before a byte is written, copies each chunk to its
offset in the posted buffer and tracks arrivals in a bitmap. Every loop runs without the GIL. The wire
format is specified in docs/protocol.md. This module is the one source of the format's constants:
``lossympi.wire`` imports them from here (``HEADER_FIELDS``, ``KIND_DATA``, ``DTYPE_CODES``, ...).
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

__version__ = "0.1.0"

DEF HEADER_BYTES = 32
DEF MAC_BYTES = 16
DEF VERSION = 2
DEF K_DATA = 1
DEF K_FIN = 2
DEF K_CREDIT = 3
DEF CREDIT_WAIT_NS = 2000000    # a sender out of credit grants itself a quarter window after 2 ms without a grant
DEF F_MAC = 1
DEF DEFAULT_DGRAM = 1472        # a 1500-byte MTU minus 20 (IPv4) and 8 (UDP) bytes
DEF MAX_DGRAM = 65507           # the largest UDP/IPv4 payload
DEF RECV_BATCH = 32
DEF RECV_BUF = 65536
DEF MAX_GSO_SEGS = 64
DEF GSO_MAX_BYTES = 65000
DEF SEND_MSGS = 16

# Header field offsets (little-endian); HEADER_FIELDS below names them for Python.
DEF O_VERSION = 0
DEF O_KIND = 1
DEF O_DTYPE = 2
DEF O_FLAGS = 3
DEF O_SRC = 4
DEF O_TAG = 8
DEF O_TID = 16
DEF O_INDEX = 20
DEF O_COUNT = 24
DEF O_LENGTH = 28
DEF O_STRIDE = 30

cdef uint64_t TAG_RESERVED = 0xFFFFFFFFFFFFFFFF  # refused on receive: the completed-tag map stores tag + 1

# Reject reasons (indices into the reject counters); order matches REJECT_REASONS.
DEF R_SHORT = 0
DEF R_HEADER = 1
DEF R_RANK = 2
DEF R_SIZE = 3
DEF R_MAC = 4
DEF R_SHAPE = 5
DEF N_REASONS = 6

REJECT_REASONS = ("short", "header", "rank", "size", "mac", "shape")
HEADER_SIZE = HEADER_BYTES
MAC_SIZE = MAC_BYTES
PROTOCOL_VERSION = VERSION
KIND_DATA = K_DATA
KIND_FIN = K_FIN
KIND_CREDIT = K_CREDIT
#: Seconds a sender out of credit waits for a grant before it grants itself a quarter of its window.
CREDIT_WAIT_SECONDS = CREDIT_WAIT_NS / 1e9
FLAG_MAC = F_MAC
DEFAULT_DATAGRAM_BYTES = DEFAULT_DGRAM
MAX_DATAGRAM_BYTES = MAX_DGRAM
RESERVED_TAG = int(TAG_RESERVED)
#: ``(name, byte offset, struct code)`` of every header field, in order; the offsets are the ones the core uses.
HEADER_FIELDS = (
    ("version", O_VERSION, "B"), ("kind", O_KIND, "B"), ("dtype", O_DTYPE, "B"), ("flags", O_FLAGS, "B"),
    ("src", O_SRC, "I"), ("tag", O_TAG, "Q"), ("tensor_id", O_TID, "I"), ("index", O_INDEX, "I"),
    ("count", O_COUNT, "I"), ("length", O_LENGTH, "H"), ("stride", O_STRIDE, "H"),
)
#: The header as a ``struct`` format (little-endian, no padding).
HEADER_FORMAT = "<" + "".join(code for _name, _off, code in HEADER_FIELDS)
#: Wire code of each element type (numpy dtype name -> code). The core treats the code as opaque: a receive
#: takes only datagrams whose code equals its own.
DTYPE_CODES = {
    "int8": 1, "uint8": 2, "int16": 3, "uint16": 4, "int32": 5, "uint32": 6, "int64": 7, "uint64": 8,
    "float16": 9, "float32": 10, "float64": 11, "bfloat16": 12,
}


cdef extern from "lm_blake2b.h" nogil:
    ctypedef struct lm_b2b_state:
        size_t buflen
    void lm_b2b_init_key(lm_b2b_state *S, size_t outlen, const uint8_t *key, size_t keylen)
    void lm_b2b_prepare(lm_b2b_state *S)
    void lm_b2b_update(lm_b2b_state *S, const uint8_t *data, size_t n)
    void lm_b2b_final(lm_b2b_state *S, uint8_t *out)


cdef extern from "lm_mac.h" nogil:
    ctypedef struct lm_mac_key:
        pass
    void lm_mac_setup()
    int lm_mac_fast
    const char *LM_MAC_LABEL
    void lm_mac_init(lm_mac_key *k, const uint8_t *pair_key)
    void lm_mac2(const lm_mac_key *k, const uint8_t *a, size_t alen, const uint8_t *b, size_t blen, uint8_t *out)
    void lm_mac2_impl(const lm_mac_key *k, const uint8_t *a, size_t alen, const uint8_t *b, size_t blen,
                      uint8_t *out, int fast)
    int lm_ct_equal(const uint8_t *a, const uint8_t *b, size_t n)


cdef extern from "lm_net.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    ctypedef struct lm_addr:
        pass
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags)
    int recvmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags, void *timeout)
    int MSG_DONTWAIT
    int MSG_TRUNC
    int EAGAIN
    int EWOULDBLOCK
    int EINTR
    int EIO
    int EINVAL
    int ENOBUFS
    int EPERM
    int ECONNREFUSED
    int EMSGSIZE
    int LM_CTRL_BYTES
    int lm_errno()
    uint64_t lm_now_ns()
    void lm_sleep_ns(uint64_t ns)
    int lm_wait_writable(int fd, int timeout_ms)
    void lm_addr_set(lm_addr *a, uint32_t ip_be, uint16_t port)
    int lm_addr_eq(const lm_addr *a, const lm_addr *b)
    void lm_msg_set_gso(msghdr *m, char *ctrl, uint16_t gso_size)
    int lm_msg_gro_size(msghdr *m)
    uint16_t lm_ld16(const uint8_t *p)
    uint32_t lm_ld32(const uint8_t *p)
    uint64_t lm_ld64(const uint8_t *p)
    void lm_st16(uint8_t *p, uint16_t v)
    void lm_st32(uint8_t *p, uint32_t v)
    void lm_st64(uint8_t *p, uint64_t v)
    uint32_t lm_grant_load(uint32_t *g)
    void lm_grant_store(uint32_t *g, uint32_t v)
    int lm_grant_raise(uint32_t *g, uint32_t v)
    void lm_grant_wait(uint32_t *g, uint32_t seen, uint64_t timeout_ns)


def blake2b_mac(bytes key, const uint8_t[::1] data, int outlen=16):
    """Keyed BLAKE2b of ``data`` as computed by the core (for tests against ``hashlib``)."""
    if not 1 <= len(key) <= 64 or not 1 <= outlen <= 64:
        raise ValueError("key must be 1..64 bytes and outlen 1..64")
    cdef lm_b2b_state S
    cdef uint8_t out[64]
    cdef const uint8_t *k = key
    lm_b2b_init_key(&S, outlen, k, len(key))
    if data.shape[0] > 0:
        lm_b2b_update(&S, &data[0], data.shape[0])
    lm_b2b_final(&S, out)
    return bytes(out[:outlen])


lm_mac_setup()
MAC_LABEL = <bytes>LM_MAC_LABEL  # what the MAC's keys are derived with (docs/protocol.md)
HAVE_CLMUL = bool(lm_mac_fast)  # the MAC runs on PCLMULQDQ + AES-NI (else portable C)


def datagram_mac(bytes pair_key, const uint8_t[::1] header, const uint8_t[::1] payload, fast=None):
    """The 16-byte MAC of ``header || payload`` under ``pair_key``, as the core computes it (docs/protocol.md,
    "Authentication and keys"; for tests against :func:`lossympi.wire.mac`). ``fast=False`` forces the portable
    code, ``True`` the PCLMULQDQ + AES-NI code (where the CPU has it), ``None`` what the core uses."""
    if len(pair_key) != 32:
        raise ValueError(f"pair key must be 32 bytes, got {len(pair_key)}")
    if fast and not lm_mac_fast:
        raise ValueError("this CPU has no PCLMULQDQ + AES-NI: use fast=False or None")
    cdef lm_mac_key k
    cdef uint8_t out[16]
    cdef uint8_t empty = 0
    lm_mac_init(&k, <const uint8_t *>pair_key)
    lm_mac2_impl(&k, &header[0] if header.shape[0] else &empty, header.shape[0],
                 &payload[0] if payload.shape[0] else &empty, payload.shape[0], out,
                 lm_mac_fast if fast is None else (1 if fast else 0))
    return bytes(out[:16])


MAC_IMPLS = ("clmul", "portable", "blake2b")


def mac_seconds(int nbytes, long reps, str impl):
    """Seconds (monotonic clock) that ``reps`` MACs of one ``nbytes``-byte datagram take on this thread, without the
    GIL: what ``python -m lossympi.bench mac`` reports. ``impl``: ``"clmul"`` (PCLMULQDQ + AES-NI), ``"portable"``
    (the C fallback) or ``"blake2b"`` (protocol version 1's keyed BLAKE2b-128 in scalar C, from a prepared key
    state, for comparison). Each MAC is folded into the next datagram, so none can be skipped."""
    if impl not in MAC_IMPLS:
        raise ValueError(f"impl must be one of {MAC_IMPLS}, got {impl!r}")
    if impl == "clmul" and not lm_mac_fast:
        raise ValueError("this CPU has no PCLMULQDQ + AES-NI: time 'portable' or 'blake2b'")
    if not HEADER_BYTES <= nbytes <= MAX_DGRAM or reps < 1:
        raise ValueError(f"nbytes must be {HEADER_BYTES}..{MAX_DGRAM} and reps >= 1")
    cdef lm_mac_key k
    cdef lm_b2b_state prepared, S
    cdef uint8_t key[32]
    cdef uint8_t out[16]
    cdef uint8_t *buf = <uint8_t *>calloc(nbytes, 1)
    cdef int fast = 1 if impl == "clmul" else 0, blake = impl == "blake2b"
    cdef long r
    cdef uint64_t t0, t1
    if buf == NULL:
        raise MemoryError()
    memset(key, 7, 32)
    lm_mac_init(&k, key)
    lm_b2b_init_key(&prepared, MAC_BYTES, key, 32)
    lm_b2b_prepare(&prepared)
    with nogil:
        t0 = lm_now_ns()
        for r in range(reps):
            if blake:
                S = prepared
                lm_b2b_update(&S, buf, nbytes)
                lm_b2b_final(&S, out)
            else:
                lm_mac2_impl(&k, buf, HEADER_BYTES, buf + HEADER_BYTES, nbytes - HEADER_BYTES, out, fast)
            buf[r % nbytes] ^= out[0]
        t1 = lm_now_ns()
    free(buf)
    return (t1 - t0) * 1e-9


def stride_for(int datagram_bytes):
    """Chunk payload bytes for a datagram size: ``floor((datagram_bytes - 48) / 16) * 16``."""
    if datagram_bytes < HEADER_BYTES + MAC_BYTES + 16 or datagram_bytes > MAX_DGRAM:
        raise ValueError(
            f"datagram_bytes={datagram_bytes} is out of range: use 64..{MAX_DGRAM} "
            f"({DEFAULT_DGRAM} fits a 1500-byte MTU; 8972 a 9000-byte jumbo MTU)")
    return ((datagram_bytes - HEADER_BYTES - MAC_BYTES) // 16) * 16


def chunk_count(uint64_t nbytes, int stride):
    """Number of chunks of a message: ``max(1, ceil(nbytes / stride))``."""
    if nbytes == 0:
        return 1
    return <uint64_t>((nbytes + stride - 1) // stride)


cdef struct Slot:
    int state          # 0 free, 1 open, 2 open and complete
    uint32_t src
    uint32_t tid
    uint64_t tag
    uint8_t dtype
    uint16_t stride
    uint32_t count
    uint64_t nbytes
    uint8_t *buf
    uint8_t *bitmap
    uint32_t nrecv
    uint64_t dup
    uint64_t bytes_recv
    int fin            # the sender said it has sent everything (a FIN datagram arrived)
    uint32_t credit    # receiver-driven ingest: window in chunks (0: the sender is not credit-driven)
    uint32_t hi        # 1 + the highest chunk index received
    uint32_t granted   # the last grant sent (the sender starts with ``credit``)
    # the receive's window of the per-claimed-rank counters: at the post, and when the last chunk arrived
    uint64_t rej0[N_REASONS]
    uint64_t rej1[N_REASONS]
    uint64_t stale0
    uint64_t stale1


cdef struct Credit:
    # What the receiver of the message being sent to one rank lets this rank send (chunk indices < grant). The
    # sending thread opens it (tag, tid, grant, then open), the receive path raises grant; both use atomics.
    uint64_t tag
    uint32_t tid
    uint32_t open
    uint32_t grant


cdef struct SendJob:
    # One message being sent, and the buffers of its current sendmmsg batch (Core._send and its helpers).
    int dst
    const uint8_t *base
    uint64_t nbytes
    uint8_t dtype
    uint64_t tag
    uint32_t tid
    uint32_t count
    const uint32_t *idx
    uint64_t nidx
    bint corrupt
    int maclen
    int seg_full
    int segs_per_msg
    uint8_t *hm
    iovec *iov
    mmsghdr *msgs
    char *ctrl
    const uint8_t **spay
    uint32_t *slen
    uint8_t *cbuf
    int nm
    int ns
    uint64_t batch_bytes


cdef void _job_free(SendJob *j) noexcept nogil:
    free(j.hm); free(j.iov); free(j.msgs); free(j.ctrl); free(<void *>j.spay); free(j.slen); free(j.cbuf)
    j.hm = NULL; j.iov = NULL; j.msgs = NULL; j.ctrl = NULL; j.spay = NULL; j.slen = NULL; j.cbuf = NULL


cdef inline uint64_t _mix(uint64_t x) nogil:
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef class Core:
    """The datagram engine of one endpoint (one UDP socket, one rank).

    Not thread-safe for concurrent ``progress``/``post``/``close`` calls; ``send`` may run in another
    thread at the same time (it touches only the socket and read-only key state).
    """

    cdef int fd
    cdef readonly int rank
    cdef readonly int nranks
    cdef readonly bint auth
    cdef readonly int datagram_bytes
    cdef readonly int stride
    cdef public bint gso
    cdef public bint check_address
    cdef lm_mac_key *keys
    cdef uint8_t *has_key
    cdef lm_addr *peers
    cdef uint8_t *has_peer
    # posted receives
    cdef Slot *slots
    cdef int nslots
    cdef int slots_hi          # 1 + highest slot index ever opened (bounds the search)
    cdef int last_hit          # slot that matched the previous datagram (flows come in runs)
    cdef int *done_list
    cdef int ndone
    cdef int *fin_list
    cdef int nfin
    cdef readonly uint64_t fins
    cdef object slot_refs
    # completed tags: (src << 32 | tid) + 1 -> highest completed tag + 1
    cdef uint64_t *cm_keys
    cdef uint64_t *cm_vals
    cdef size_t cm_cap
    cdef size_t cm_n
    # unexpected-datagram pool
    cdef uint8_t *pool
    cdef uint8_t *pool_used
    cdef uint32_t *pool_len
    cdef uint32_t *pool_src
    cdef uint32_t *pool_tid
    cdef uint64_t *pool_tag
    cdef uint32_t *pool_free
    cdef uint32_t *pool_per_src
    cdef uint32_t pool_nfree
    cdef uint32_t pool_n
    cdef uint32_t pool_entry
    cdef uint32_t pool_quota
    # receive staging
    cdef mmsghdr *rmsgs
    cdef iovec *riov
    cdef uint8_t *rbufs
    cdef char *rctrl
    cdef lm_addr *raddrs
    cdef const uint8_t **cand_ptr   # datagrams of one recvmmsg batch that passed steps 1-4
    cdef uint32_t *cand_len
    cdef uint32_t *cand_src
    cdef uint32_t *cand_frm         # index into raddrs of each candidate (who really sent it)
    # counters
    cdef readonly uint64_t datagrams
    cdef readonly uint64_t accepted
    cdef readonly uint64_t duplicates
    cdef readonly uint64_t stale
    cdef readonly uint64_t overflow
    cdef readonly uint64_t pooled
    cdef readonly int last_errno
    cdef uint64_t rejects[N_REASONS]
    cdef uint64_t *rejected_src     # nranks x N_REASONS: by the rank the datagram claims (header src)
    cdef uint64_t *stale_src
    cdef uint64_t *rejected_sender  # (nranks + 1) x N_REASONS: by the rank that really sent it; row nranks: unknown
    cdef uint64_t *overflow_src
    cdef int last_sender
    cdef Credit *credit             # per destination rank: the grant of the message being sent to it
    cdef readonly uint64_t credits_sent
    cdef readonly uint64_t credits_received
    cdef readonly uint64_t credit_timeouts   # written by the sending thread only

    def __cinit__(self, int fd, int rank, int nranks, *, bint auth=True, int datagram_bytes=DEFAULT_DGRAM,
                  bint gso=False, int max_slots=1024, uint64_t unexpected_bytes=64 << 20,
                  bint check_address=False):
        cdef int i
        if nranks < 1 or not 0 <= rank < nranks:
            raise ValueError(f"rank {rank} is not in [0, {nranks})")
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.stride = stride_for(datagram_bytes)
        self.fd = fd
        self.rank = rank
        self.nranks = nranks
        self.auth = auth
        self.datagram_bytes = datagram_bytes
        self.gso = gso
        self.check_address = check_address
        self.keys = <lm_mac_key *>calloc(nranks, sizeof(lm_mac_key))
        self.has_key = <uint8_t *>calloc(nranks, 1)
        self.peers = <lm_addr *>calloc(nranks, sizeof(lm_addr))
        self.has_peer = <uint8_t *>calloc(nranks, 1)
        self.rejected_src = <uint64_t *>calloc(<size_t>nranks * N_REASONS, sizeof(uint64_t))
        self.stale_src = <uint64_t *>calloc(nranks, sizeof(uint64_t))
        self.rejected_sender = <uint64_t *>calloc(<size_t>(nranks + 1) * N_REASONS, sizeof(uint64_t))
        self.overflow_src = <uint64_t *>calloc(nranks, sizeof(uint64_t))
        self.credit = <Credit *>calloc(nranks, sizeof(Credit))
        self.nslots = max_slots
        self.slots = <Slot *>calloc(max_slots, sizeof(Slot))
        self.done_list = <int *>calloc(max_slots, sizeof(int))
        self.fin_list = <int *>calloc(max_slots, sizeof(int))
        self.slot_refs = [None] * max_slots
        self.cm_cap = 256
        self.cm_keys = <uint64_t *>calloc(self.cm_cap, sizeof(uint64_t))
        self.cm_vals = <uint64_t *>calloc(self.cm_cap, sizeof(uint64_t))
        self.pool_entry = <uint32_t>datagram_bytes
        self.pool_n = <uint32_t>max(16, unexpected_bytes // datagram_bytes)
        self.pool_quota = max(16, self.pool_n // max(1, nranks - 1))
        self.pool = <uint8_t *>malloc(<size_t>self.pool_n * self.pool_entry)
        self.pool_used = <uint8_t *>calloc(self.pool_n, 1)
        self.pool_len = <uint32_t *>calloc(self.pool_n, sizeof(uint32_t))
        self.pool_src = <uint32_t *>calloc(self.pool_n, sizeof(uint32_t))
        self.pool_tid = <uint32_t *>calloc(self.pool_n, sizeof(uint32_t))
        self.pool_tag = <uint64_t *>calloc(self.pool_n, sizeof(uint64_t))
        self.pool_free = <uint32_t *>calloc(self.pool_n, sizeof(uint32_t))
        self.pool_per_src = <uint32_t *>calloc(nranks, sizeof(uint32_t))
        self.rmsgs = <mmsghdr *>calloc(RECV_BATCH, sizeof(mmsghdr))
        self.riov = <iovec *>calloc(RECV_BATCH, sizeof(iovec))
        self.rbufs = <uint8_t *>malloc(<size_t>RECV_BATCH * RECV_BUF)
        self.rctrl = <char *>calloc(RECV_BATCH, LM_CTRL_BYTES)
        self.raddrs = <lm_addr *>calloc(RECV_BATCH, sizeof(lm_addr))
        self.cand_ptr = <const uint8_t **>calloc(RECV_BATCH * (RECV_BUF // HEADER_BYTES), sizeof(uint8_t *))
        self.cand_len = <uint32_t *>calloc(RECV_BATCH * (RECV_BUF // HEADER_BYTES), sizeof(uint32_t))
        self.cand_src = <uint32_t *>calloc(RECV_BATCH * (RECV_BUF // HEADER_BYTES), sizeof(uint32_t))
        self.cand_frm = <uint32_t *>calloc(RECV_BATCH * (RECV_BUF // HEADER_BYTES), sizeof(uint32_t))
        if (self.keys == NULL or self.has_key == NULL or self.peers == NULL or self.has_peer == NULL
                or self.slots == NULL or self.done_list == NULL or self.fin_list == NULL or self.cm_keys == NULL
                or self.cm_vals == NULL or self.pool == NULL or self.pool_used == NULL
                or self.pool_len == NULL or self.pool_src == NULL or self.pool_tid == NULL
                or self.pool_tag == NULL or self.pool_free == NULL or self.pool_per_src == NULL
                or self.rmsgs == NULL or self.riov == NULL or self.rbufs == NULL
                or self.rctrl == NULL or self.raddrs == NULL or self.rejected_src == NULL
                or self.stale_src == NULL or self.cand_ptr == NULL or self.cand_len == NULL
                or self.cand_src == NULL or self.cand_frm == NULL or self.rejected_sender == NULL
                or self.overflow_src == NULL or self.credit == NULL):
            raise MemoryError("lossympi core: cannot allocate buffers (lower unexpected_bytes?)")
        for i in range(<int>self.pool_n):
            self.pool_free[i] = self.pool_n - 1 - i
        self.pool_nfree = self.pool_n
        for i in range(RECV_BATCH):
            self.riov[i].iov_base = self.rbufs + <size_t>i * RECV_BUF
            self.riov[i].iov_len = RECV_BUF
        memset(self.rejects, 0, sizeof(self.rejects))

    def __dealloc__(self):
        free(self.keys); free(self.has_key); free(self.peers); free(self.has_peer)
        free(self.slots); free(self.done_list); free(self.fin_list); free(self.cm_keys); free(self.cm_vals)
        free(self.pool); free(self.pool_used); free(self.pool_len); free(self.pool_src)
        free(self.pool_tid); free(self.pool_tag); free(self.pool_free); free(self.pool_per_src)
        free(self.rmsgs); free(self.riov); free(self.rbufs); free(self.rctrl); free(self.raddrs)
        free(self.rejected_src); free(self.stale_src)
        free(self.cand_ptr); free(self.cand_len); free(self.cand_src); free(self.cand_frm)
        free(self.rejected_sender); free(self.overflow_src); free(self.credit)

    # ------------------------------------------------------------------ configuration
    def set_key(self, int peer, bytes key):
        """Install the 32-byte pair key shared with ``peer``."""
        self._check_rank(peer)
        if len(key) != 32:
            raise ValueError(f"pair key for rank {peer} must be 32 bytes, got {len(key)}")
        cdef const uint8_t *k = key
        lm_mac_init(&self.keys[peer], k)
        self.has_key[peer] = 1

    def set_peer(self, int peer, bytes ip4, int port):
        """Set the UDP address of ``peer`` (``ip4``: 4 bytes as from ``socket.inet_aton``)."""
        self._check_rank(peer)
        if len(ip4) != 4 or not 0 < port < 65536:
            raise ValueError("peer address must be 4 IPv4 bytes and a port in 1..65535")
        cdef uint32_t ip
        memcpy(&ip, <const char *>ip4, 4)
        lm_addr_set(&self.peers[peer], ip, <uint16_t>port)
        self.has_peer[peer] = 1

    cdef _check_rank(self, int peer):
        if not 0 <= peer < self.nranks:
            raise ValueError(f"rank {peer} is not in [0, {self.nranks})")

    # ------------------------------------------------------------------ statistics
    def rejects_by_reason(self):
        return {REJECT_REASONS[i]: int(self.rejects[i]) for i in range(N_REASONS)}

    def rejected_from(self, int peer):
        """Rejected datagrams whose header claims to come from ``peer`` (every reason)."""
        return sum(self.rejects_from(peer))

    def rejects_from(self, int peer):
        """Rejected datagrams whose header claims to come from ``peer``, by reason (``REJECT_REASONS`` order).

        The claim is the header's ``src`` of a datagram of at least ``HEADER_SIZE`` bytes with ``src < nranks``,
        whatever check it failed (a ``header`` reject included).
        """
        self._check_rank(peer)
        cdef int i
        return [int(self.rejected_src[<size_t>peer * N_REASONS + i]) for i in range(N_REASONS)]

    def stale_from(self, int peer):
        self._check_rank(peer)
        return int(self.stale_src[peer])

    def overflow_from(self, int peer):
        """Authenticated datagrams of ``peer`` dropped because its share of the unexpected pool was full."""
        self._check_rank(peer)
        return int(self.overflow_src[peer])

    def rejects_by_sender(self):
        """Rejected datagrams by the rank that really sent them, and by reason.

        A list of ``nranks + 1`` lists of ``len(REJECT_REASONS)`` counts. Row ``r`` counts the datagrams that
        came from rank ``r``'s registered address (or, for ``shape`` rejects, that authenticated as ``r``);
        the last row those from an address that is no rank's. Unlike :meth:`rejected_from`, which trusts the
        header's ``src``, a rank claiming another's identity is charged here, not its victim.
        """
        cdef int r, i
        return [[int(self.rejected_sender[<size_t>r * N_REASONS + i]) for i in range(N_REASONS)]
                for r in range(self.nranks + 1)]

    @property
    def pool_in_use(self):
        return int(self.pool_n - self.pool_nfree)

    # ------------------------------------------------------------------ completed-tag map
    cdef uint64_t _cm_get(self, uint32_t src, uint32_t tid) noexcept nogil:
        cdef uint64_t key = ((<uint64_t>src << 32) | tid) + 1
        cdef size_t mask = self.cm_cap - 1
        cdef size_t i = _mix(key) & mask
        while self.cm_keys[i] != 0:
            if self.cm_keys[i] == key:
                return self.cm_vals[i]
            i = (i + 1) & mask
        return 0

    cdef int _cm_put(self, uint64_t key, uint64_t val) noexcept nogil:
        cdef size_t mask = self.cm_cap - 1
        cdef size_t i = _mix(key) & mask
        while self.cm_keys[i] != 0:
            if self.cm_keys[i] == key:
                if val > self.cm_vals[i]:
                    self.cm_vals[i] = val
                return 0
            i = (i + 1) & mask
        self.cm_keys[i] = key
        self.cm_vals[i] = val
        self.cm_n += 1
        return 0

    cdef int _cm_set(self, uint32_t src, uint32_t tid, uint64_t tag) noexcept nogil:
        cdef uint64_t *ok
        cdef uint64_t *ov
        cdef size_t ocap, i
        if (self.cm_n + 1) * 2 > self.cm_cap:
            ok = self.cm_keys
            ov = self.cm_vals
            ocap = self.cm_cap
            self.cm_keys = <uint64_t *>calloc(ocap * 2, sizeof(uint64_t))
            self.cm_vals = <uint64_t *>calloc(ocap * 2, sizeof(uint64_t))
            if self.cm_keys == NULL or self.cm_vals == NULL:
                free(self.cm_keys); free(self.cm_vals)
                self.cm_keys = ok
                self.cm_vals = ov
                return -1
            self.cm_cap = ocap * 2
            self.cm_n = 0
            for i in range(ocap):
                if ok[i] != 0:
                    self._cm_put(ok[i], ov[i])
            free(ok); free(ov)
        return self._cm_put(((<uint64_t>src << 32) | tid) + 1, tag + 1)

    def completed_tag(self, int src, uint32_t tid):
        """Highest tag completed for ``(src, tid)``, or -1."""
        self._check_rank(src)
        return int(self._cm_get(src, tid)) - 1

    # ------------------------------------------------------------------ receive path
    cdef int _sender_of(self, const lm_addr *frm) noexcept nogil:
        """The rank whose registered address ``frm`` is, or ``nranks`` (unknown)."""
        cdef int i = self.last_sender
        if self.has_peer[i] and lm_addr_eq(frm, &self.peers[i]):
            return i
        for i in range(self.nranks):
            if self.has_peer[i] and lm_addr_eq(frm, &self.peers[i]):
                self.last_sender = i
                return i
        return self.nranks

    cdef inline int64_t _claimed(self, const uint8_t *d, uint32_t L) noexcept nogil:
        """The rank a datagram's header claims, or -1 (shorter than a header, or ``src`` is no rank)."""
        cdef uint32_t src
        if L < HEADER_BYTES:
            return -1
        src = lm_ld32(d + O_SRC)
        return src if src < <uint32_t>self.nranks else -1

    cdef inline void _reject(self, int reason, int64_t src, int sender) noexcept nogil:
        """Count a drop: ``src`` is the rank the header claims (-1: none), ``sender`` the one that sent it."""
        self.rejects[reason] += 1
        if src >= 0:
            self.rejected_src[<size_t>src * N_REASONS + reason] += 1
        self.rejected_sender[<size_t>sender * N_REASONS + reason] += 1

    cdef int _find_slot(self, uint32_t src, uint64_t tag, uint32_t tid) noexcept nogil:
        cdef int i = self.last_hit
        if (self.slots[i].state != 0 and self.slots[i].src == src and self.slots[i].tag == tag
                and self.slots[i].tid == tid):
            return i
        for i in range(self.slots_hi):
            if (self.slots[i].state != 0 and self.slots[i].src == src and self.slots[i].tag == tag
                    and self.slots[i].tid == tid):
                self.last_hit = i
                return i
        return -1

    cdef void _deliver(self, int s, const uint8_t *d, uint32_t plen) noexcept nogil:
        """Step 7 of docs/protocol.md: shape checks, then the only write into a user buffer."""
        cdef Slot *sl = &self.slots[s]
        cdef uint32_t index = lm_ld32(d + O_INDEX)
        cdef uint32_t count = lm_ld32(d + O_COUNT)
        cdef uint16_t stride = lm_ld16(d + O_STRIDE)
        cdef uint64_t expect
        if d[O_KIND] == K_FIN:  # index 0 and no payload: checked in step 2
            if d[O_DTYPE] != sl.dtype or count != sl.count or stride != sl.stride:
                self._reject(R_SHAPE, sl.src, sl.src)
                return
            self.fins += 1
            if not sl.fin and sl.state == 1:
                sl.fin = 1
                self.fin_list[self.nfin] = s
                self.nfin += 1
            return
        if d[O_DTYPE] != sl.dtype or count != sl.count or stride != sl.stride or index >= count:
            self._reject(R_SHAPE, sl.src, sl.src)
            return
        if index + 1 < count:
            expect = stride
        else:
            expect = sl.nbytes - <uint64_t>stride * (count - 1)
        if plen != expect:
            self._reject(R_SHAPE, sl.src, sl.src)
            return
        if sl.bitmap[index >> 3] & (1 << (index & 7)):
            sl.dup += 1
            self.duplicates += 1
            return
        if plen:
            memcpy(sl.buf + <uint64_t>index * stride, d + HEADER_BYTES, plen)
        sl.bitmap[index >> 3] |= <uint8_t>(1 << (index & 7))
        sl.nrecv += 1
        sl.bytes_recv += plen
        self.accepted += 1
        if sl.credit:
            self._grant(sl, index)
        if sl.nrecv == sl.count and sl.state == 1:
            sl.state = 2
            self._window_mark(sl, sl.rej1, &sl.stale1)
            self.done_list[self.ndone] = s
            self.ndone += 1

    cdef inline void _grant(self, Slot *sl, uint32_t index) noexcept nogil:
        """Receiver-driven ingest: once chunk ``index`` is drained, let the sender run ``credit`` chunks past the
        highest index received; a grant goes out each time that bound moved a quarter window (or reached the end)."""
        cdef uint32_t step = sl.credit >> 2
        cdef uint64_t g
        if index + 1 > sl.hi:
            sl.hi = index + 1
        g = <uint64_t>sl.hi + sl.credit
        if g > sl.count:
            g = sl.count
        if g >= <uint64_t>sl.granted + (step if step > 0 else 1) or (g == sl.count and sl.granted < sl.count):
            sl.granted = <uint32_t>g
            self._send_credit(sl)

    cdef void _send_credit(self, Slot *sl) noexcept nogil:
        """One CREDIT datagram to ``sl``'s sender: the message's header, ``index`` = the grant, no payload."""
        cdef uint8_t buf[HEADER_BYTES + MAC_BYTES]
        cdef iovec iov
        cdef mmsghdr m
        if not self.has_peer[sl.src] or (self.auth and not self.has_key[sl.src]):
            return
        self._put_header(buf, K_CREDIT, sl.dtype, sl.tag, sl.tid, sl.granted, sl.count, 0)
        if self.auth:
            lm_mac2(&self.keys[sl.src], buf, HEADER_BYTES, NULL, 0, buf + HEADER_BYTES)
        iov.iov_base = buf
        iov.iov_len = HEADER_BYTES + (MAC_BYTES if self.auth else 0)
        memset(&m, 0, sizeof(m))
        m.msg_hdr.msg_name = &self.peers[sl.src]
        m.msg_hdr.msg_namelen = sizeof(lm_addr)
        m.msg_hdr.msg_iov = &iov
        m.msg_hdr.msg_iovlen = 1
        if sendmmsg(self.fd, &m, 1, MSG_DONTWAIT) == 1:  # a credit that cannot leave now is one the sender waits out
            self.credits_sent += 1

    cdef inline void _window_mark(self, Slot *sl, uint64_t *rej, uint64_t *stale) noexcept nogil:
        """Copy the counters of ``sl``'s sender claimed in headers (rejects by reason, stale) to ``rej``/``stale``."""
        memcpy(rej, self.rejected_src + <size_t>sl.src * N_REASONS, N_REASONS * sizeof(uint64_t))
        stale[0] = self.stale_src[sl.src]

    cdef void _pool_put(self, const uint8_t *d, uint32_t L, uint32_t src, uint64_t tag,
                        uint32_t tid) noexcept nogil:
        cdef uint32_t e
        if L > self.pool_entry or self.pool_nfree == 0 or self.pool_per_src[src] >= self.pool_quota:
            self.overflow += 1
            self.overflow_src[src] += 1
            return
        self.pool_nfree -= 1
        e = self.pool_free[self.pool_nfree]
        memcpy(self.pool + <size_t>e * self.pool_entry, d, L)
        self.pool_used[e] = 1
        self.pool_len[e] = L
        self.pool_src[e] = src
        self.pool_tid[e] = tid
        self.pool_tag[e] = tag
        self.pool_per_src[src] += 1
        self.pooled += 1

    cdef inline void _pool_release(self, uint32_t e) noexcept nogil:
        self.pool_used[e] = 0
        self.pool_per_src[self.pool_src[e]] -= 1
        self.pool_free[self.pool_nfree] = e
        self.pool_nfree += 1

    cdef void _pool_drain(self, int s) noexcept nogil:
        """Hand the pooled datagrams of slot ``s``'s message to it."""
        cdef uint32_t e
        cdef Slot *sl = &self.slots[s]
        cdef const uint8_t *d
        if self.pool_nfree == self.pool_n:
            return
        for e in range(self.pool_n):
            if (self.pool_used[e] and self.pool_src[e] == sl.src and self.pool_tid[e] == sl.tid
                    and self.pool_tag[e] == sl.tag):
                d = self.pool + <size_t>e * self.pool_entry
                self._deliver(s, d, lm_ld16(d + O_LENGTH))
                self._pool_release(e)

    cdef void _pool_purge(self, uint32_t src, uint32_t tid, uint64_t upto) noexcept nogil:
        cdef uint32_t e
        if self.pool_nfree == self.pool_n:
            return
        for e in range(self.pool_n):
            if (self.pool_used[e] and self.pool_src[e] == src and self.pool_tid[e] == tid
                    and self.pool_tag[e] <= upto):
                self._pool_release(e)
                self.stale += 1
                self.stale_src[src] += 1

    cdef int64_t _precheck(self, const uint8_t *d, uint32_t L, const lm_addr *frm) noexcept nogil:
        """Steps 1-4 of docs/protocol.md (and the presence of a MAC and key); returns src or -1.

        Every drop is charged to the rank the header claims (``src``) once the datagram holds a header whose
        ``src`` is a rank, and to the rank whose address it came from.
        """
        cdef uint32_t src, plen, maclen
        cdef int64_t claim
        self.datagrams += 1
        if L < HEADER_BYTES:
            self._reject(R_SHORT, -1, self._sender_of(frm))
            return -1
        src = lm_ld32(d + O_SRC)
        claim = self._claimed(d, L)
        plen = lm_ld16(d + O_LENGTH)
        if (d[O_VERSION] != VERSION or d[O_KIND] < K_DATA or d[O_KIND] > K_CREDIT or (d[O_FLAGS] & ~F_MAC) != 0
                or lm_ld64(d + O_TAG) == TAG_RESERVED
                or (d[O_KIND] == K_FIN and (plen != 0 or lm_ld32(d + O_INDEX) != 0))
                or (d[O_KIND] == K_CREDIT and (plen != 0 or lm_ld32(d + O_INDEX) > lm_ld32(d + O_COUNT)))):
            self._reject(R_HEADER, claim, self._sender_of(frm))
            return -1
        if claim < 0:
            self._reject(R_RANK, -1, self._sender_of(frm))
            return -1
        if self.check_address and self.has_peer[src] and not lm_addr_eq(frm, &self.peers[src]):
            self._reject(R_RANK, src, self._sender_of(frm))
            return -1
        maclen = MAC_BYTES if (d[O_FLAGS] & F_MAC) else 0
        if HEADER_BYTES + plen + maclen != L:
            self._reject(R_SIZE, src, self._sender_of(frm))
            return -1
        if self.auth and (maclen == 0 or not self.has_key[src]):
            self._reject(R_MAC, src, self._sender_of(frm))
            return -1
        return src

    cdef void _dispatch(self, const uint8_t *d, uint32_t L, uint32_t src) noexcept nogil:
        """Steps 6-7 for an authenticated datagram: its open receive, or stale, or the pool (a CREDIT: the grant
        of the message this rank is sending to ``src``)."""
        cdef uint64_t tag = lm_ld64(d + O_TAG), done
        cdef uint32_t tid = lm_ld32(d + O_TID)
        cdef Credit *c
        cdef int s
        if d[O_KIND] == K_CREDIT:
            self.credits_received += 1
            c = &self.credit[src]
            if lm_grant_load(&c.open) and c.tag == tag and c.tid == tid:
                lm_grant_raise(&c.grant, lm_ld32(d + O_INDEX))
            return
        s = self._find_slot(src, tag, tid)
        if s >= 0:
            self._deliver(s, d, lm_ld16(d + O_LENGTH))
            return
        done = self._cm_get(src, tid)
        if done != 0 and tag < done:
            if d[O_KIND] == K_FIN:  # the end of a message already closed: nothing to do, nothing wrong
                self.fins += 1
                return
            self.stale += 1
            self.stale_src[src] += 1
            return
        self._pool_put(d, L, src, tag, tid)

    cdef void _verify_and_dispatch(self, int nc) noexcept nogil:
        """Step 5 (MAC), then dispatch, in arrival order."""
        cdef int i
        cdef uint32_t L
        cdef uint8_t mac[MAC_BYTES]
        for i in range(nc):
            L = self.cand_len[i]
            if self.auth:
                lm_mac2(&self.keys[self.cand_src[i]], self.cand_ptr[i], L - MAC_BYTES, NULL, 0, mac)
                if not lm_ct_equal(mac, self.cand_ptr[i] + L - MAC_BYTES, MAC_BYTES):
                    self._reject(R_MAC, self.cand_src[i], self._sender_of(&self.raddrs[self.cand_frm[i]]))
                    continue
            self._dispatch(self.cand_ptr[i], L, self.cand_src[i])

    cdef int _progress(self, int budget) noexcept nogil:
        cdef int n, i, total = 0, seg, err, nc
        cdef int64_t src
        cdef uint32_t L, off, sl
        cdef msghdr *h
        cdef uint8_t *buf
        while total < budget:
            for i in range(RECV_BATCH):
                h = &self.rmsgs[i].msg_hdr
                h.msg_name = &self.raddrs[i]
                h.msg_namelen = sizeof(lm_addr)
                h.msg_iov = &self.riov[i]
                h.msg_iovlen = 1
                h.msg_control = self.rctrl + <size_t>i * LM_CTRL_BYTES
                h.msg_controllen = LM_CTRL_BYTES
                h.msg_flags = 0
            n = recvmmsg(self.fd, self.rmsgs, RECV_BATCH, MSG_DONTWAIT, NULL)
            if n < 0:
                err = lm_errno()
                if err == EINTR:
                    continue
                if err != EAGAIN and err != EWOULDBLOCK:
                    self.last_errno = err
                break
            nc = 0
            for i in range(n):
                h = &self.rmsgs[i].msg_hdr
                L = self.rmsgs[i].msg_len
                buf = self.rbufs + <size_t>i * RECV_BUF
                if h.msg_flags & MSG_TRUNC:  # longer than any UDP/IPv4 datagram: a GRO batch cut short
                    self.datagrams += 1
                    self._reject(R_SIZE, self._claimed(buf, L), self._sender_of(&self.raddrs[i]))
                    continue
                seg = lm_msg_gro_size(h)
                if seg <= 0 or <uint32_t>seg > L:
                    seg = L
                if L == 0:
                    self.datagrams += 1
                    self._reject(R_SHORT, -1, self._sender_of(&self.raddrs[i]))
                    continue
                off = 0
                while off < L:
                    sl = L - off
                    if sl > <uint32_t>seg:
                        sl = seg
                    src = self._precheck(buf + off, sl, &self.raddrs[i])
                    if src >= 0 and nc < RECV_BATCH * (RECV_BUF // HEADER_BYTES):  # always true: >= 32 B each
                        self.cand_ptr[nc] = buf + off
                        self.cand_len[nc] = sl
                        self.cand_src[nc] = <uint32_t>src
                        self.cand_frm[nc] = <uint32_t>i
                        nc += 1
                    off += sl
            self._verify_and_dispatch(nc)
            total += n
            if n < RECV_BATCH:
                break
        return total

    def progress(self, int budget=4096):
        """Read and process queued datagrams, at most about ``budget``; never blocks.

        Returns the list of slot ids whose message became complete.
        """
        cdef int i
        with nogil:
            self._progress(budget)
        if self.ndone == 0:
            return []
        out = [self.done_list[i] for i in range(self.ndone)]
        self.ndone = 0
        return out

    def post(self, int src, uint64_t tag, uint32_t tid, uint8_t[::1] buf, uint8_t[::1] bitmap,
             int dtype_code, object ref=None, uint32_t credit=0):
        """Post a receive of message ``(src, tag, tid)`` into ``buf``; returns its slot id.

        ``bitmap`` (``ceil(count / 8)`` zeroed bytes) records the chunks that arrive. ``ref`` is kept
        alive while the slot is open (the owner of ``buf``). Datagrams already pooled for this message
        are delivered at once; the slot may thus be complete on return (see ``is_complete``). ``credit`` > 0:
        the sender is credit-driven with a window of that many chunks, and this receive grants it more as it
        drains (CREDIT datagrams).
        """
        cdef int s, i
        cdef uint64_t nbytes = buf.shape[0]
        cdef uint64_t count = chunk_count(nbytes, self.stride)
        self._check_rank(src)
        if count > 0xFFFFFFFF:
            raise ValueError(f"message of {nbytes} bytes needs more than 2**32 chunks")
        if <uint64_t>bitmap.shape[0] * 8 < count:
            raise ValueError("bitmap too small")
        if not 1 <= dtype_code <= 255:
            raise ValueError("bad dtype code")
        cdef uint64_t done = self._cm_get(src, tid)
        if done != 0 and tag < done:
            raise ValueError(
                f"tag {tag} from rank {src} (tensor {tid}) is not newer than the last completed tag "
                f"{done - 1}: tags must increase per (peer, tensor_id); pass tag=None to number "
                "messages automatically")
        if self._find_slot(src, tag, tid) >= 0:
            raise ValueError(f"a receive of tag {tag} from rank {src} (tensor {tid}) is already posted")
        s = -1
        for i in range(self.nslots):
            if self.slots[i].state == 0:
                s = i
                break
        if s < 0:
            raise RuntimeError(f"too many receives posted at once (max_slots={self.nslots})")
        memset(&bitmap[0], 0, bitmap.shape[0])
        if s >= self.slots_hi:
            self.slots_hi = s + 1
        self.slots[s].state = 1
        self.slots[s].src = src
        self.slots[s].tid = tid
        self.slots[s].tag = tag
        self.slots[s].dtype = <uint8_t>dtype_code
        self.slots[s].stride = <uint16_t>self.stride
        self.slots[s].count = <uint32_t>count
        self.slots[s].nbytes = nbytes
        self.slots[s].buf = &buf[0] if nbytes > 0 else NULL
        self.slots[s].bitmap = &bitmap[0]
        self.slots[s].nrecv = 0
        self.slots[s].dup = 0
        self.slots[s].bytes_recv = 0
        self.slots[s].fin = 0
        self.slots[s].credit = credit
        self.slots[s].hi = 0
        self.slots[s].granted = credit
        self._window_mark(&self.slots[s], self.slots[s].rej0, &self.slots[s].stale0)
        self.slot_refs[s] = (ref, buf, bitmap)
        with nogil:
            self._pool_drain(s)
        return s

    def slot_arrivals(self, int s):
        """Data datagrams (new and duplicate) that have reached open slot ``s`` so far."""
        if not 0 <= s < self.nslots or self.slots[s].state == 0:
            raise ValueError(f"slot {s} is not open")
        return int(self.slots[s].nrecv + self.slots[s].dup)

    def is_complete(self, int s):
        return 0 <= s < self.nslots and self.slots[s].state == 2

    def take_fins(self):
        """Open slots whose sender announced the end of its message since the last call."""
        cdef int i
        out = [self.fin_list[i] for i in range(self.nfin)]
        self.nfin = 0
        return out

    def take_done(self):
        """Slot ids completed since the last ``progress``/``take_done`` call."""
        cdef int i
        out = [self.done_list[i] for i in range(self.ndone)]
        self.ndone = 0
        return out

    def close(self, int s):
        """Close slot ``s``: no datagram writes into its buffer after this returns.

        Returns ``(chunks_received, duplicates, bytes_received, stale, rejects)``. ``stale`` and ``rejects`` (a
        list in ``REJECT_REASONS`` order) count the datagrams that claimed the slot's sender in their header and
        were stale or rejected from the post (pooled datagrams of this message included) until the last chunk
        arrived, or, for an incomplete receive, until now.
        """
        if not 0 <= s < self.nslots or self.slots[s].state == 0:
            raise ValueError(f"slot {s} is not open")
        cdef Slot *sl = &self.slots[s]
        cdef int j
        if sl.state == 1:
            self._window_mark(sl, sl.rej1, &sl.stale1)
        out = (int(sl.nrecv), int(sl.dup), int(sl.bytes_recv), int(sl.stale1 - sl.stale0),
               [int(sl.rej1[j] - sl.rej0[j]) for j in range(N_REASONS)])
        if self._cm_set(sl.src, sl.tid, sl.tag) != 0:
            raise MemoryError("lossympi core: cannot grow the completed-tag table")
        with nogil:
            self._pool_purge(sl.src, sl.tid, sl.tag)
        sl.state = 0
        sl.buf = NULL
        sl.bitmap = NULL
        cdef int i, k = 0
        for i in range(self.nfin):  # a FIN of this message no longer concerns the slot (it may be reused)
            if self.fin_list[i] != s:
                self.fin_list[k] = self.fin_list[i]
                k += 1
        self.nfin = k
        self.slot_refs[s] = None
        return out

    # ------------------------------------------------------------------ send path
    def send(self, int dst, const uint8_t[::1] data, int dtype_code, uint64_t tag, uint32_t tid,
             const uint32_t[::1] indices=None, bint corrupt=False, double rate_bps=0.0,
             uint64_t burst_bytes=0, uint32_t credit=0):
        """Send chunks of ``data`` to rank ``dst``; returns the number of datagrams sent.

        ``indices`` lists the chunks to send, in order (default: all, ascending). ``corrupt`` flips one
        payload bit of every datagram after its MAC is computed (fault injection). ``rate_bps`` > 0
        paces the sender to that many bits per second, with at most ``burst_bytes`` ahead of schedule.
        ``credit`` > 0: receiver-driven, a window of that many chunks (the receive was posted with the same
        ``credit``; see ``post``). Runs without the GIL.
        """
        self._check_rank(dst)
        if not self.has_peer[dst]:
            raise ValueError(f"no address for rank {dst}")
        if self.auth and not self.has_key[dst]:
            raise ValueError(f"no pair key for rank {dst} (authentication is on)")
        if not 1 <= dtype_code <= 255:
            raise ValueError("bad dtype code")
        cdef uint64_t nbytes = data.shape[0]
        cdef uint64_t count = chunk_count(nbytes, self.stride)
        if count > 0xFFFFFFFF:
            raise ValueError(f"message of {nbytes} bytes needs more than 2**32 chunks")
        cdef uint64_t nidx
        cdef const uint32_t *idx = NULL
        cdef uint64_t j
        if indices is None:
            nidx = count
        else:
            nidx = indices.shape[0]
            if nidx:
                idx = &indices[0]
            for j in range(nidx):
                if idx[j] >= count:
                    raise ValueError(f"chunk index {idx[j]} out of range [0, {count})")
        cdef SendJob job
        cdef int64_t r
        memset(&job, 0, sizeof(job))
        job.dst = dst
        job.base = &data[0] if nbytes > 0 else NULL
        job.nbytes = nbytes
        job.dtype = <uint8_t>dtype_code
        job.tag = tag
        job.tid = tid
        job.count = <uint32_t>count
        job.idx = idx
        job.nidx = nidx
        job.corrupt = corrupt
        with nogil:
            r = self._job_alloc(&job)
            if r == 0:
                r = self._send(&job, rate_bps, burst_bytes, credit)
                _job_free(&job)
        if r < 0:
            import errno as _errno
            import os as _os
            raise OSError(-r, f"lossympi send to rank {dst} failed: {_os.strerror(-r)}")
        return r

    def send_fin(self, int dst, int dtype_code, uint64_t tag, uint32_t tid, uint64_t nbytes, int copies=3):
        """Announce to ``dst`` that message ``(tag, tid)`` of ``nbytes`` bytes is fully sent; ``copies``
        identical FIN datagrams (index 0, no payload) make a lost announcement unlikely."""
        self._check_rank(dst)
        if not self.has_peer[dst] or (self.auth and not self.has_key[dst]):
            raise ValueError(f"no address or key for rank {dst}")
        cdef uint8_t buf[HEADER_BYTES + MAC_BYTES]
        cdef uint64_t count = chunk_count(nbytes, self.stride)
        cdef int maclen = MAC_BYTES if self.auth else 0
        cdef iovec iov
        cdef mmsghdr m[4]
        cdef int i, r, err
        if not 1 <= copies <= 4:
            raise ValueError("copies must be 1..4")
        self._put_header(buf, K_FIN, <uint8_t>dtype_code, tag, tid, 0, <uint32_t>count, 0)
        if self.auth:
            lm_mac2(&self.keys[dst], buf, HEADER_BYTES, NULL, 0, buf + HEADER_BYTES)
        iov.iov_base = buf
        iov.iov_len = HEADER_BYTES + maclen
        memset(m, 0, sizeof(m))
        for i in range(copies):
            m[i].msg_hdr.msg_name = &self.peers[dst]
            m[i].msg_hdr.msg_namelen = sizeof(lm_addr)
            m[i].msg_hdr.msg_iov = &iov
            m[i].msg_hdr.msg_iovlen = 1
        with nogil:
            r = sendmmsg(self.fd, m, copies, 0)
            err = lm_errno() if r < 0 else 0
        # A FIN that cannot be sent is only an optimisation lost: the receiver falls back to its deadline.
        return r if r >= 0 else -err

    cdef inline void _put_header(self, uint8_t *h, uint8_t kind, uint8_t dtype, uint64_t tag, uint32_t tid,
                                 uint32_t index, uint32_t count, uint16_t length) noexcept nogil:
        """Write the 32-byte header of one of this rank's datagrams (docs/protocol.md, "Datagram layout")."""
        h[O_VERSION] = VERSION
        h[O_KIND] = kind
        h[O_DTYPE] = dtype
        h[O_FLAGS] = F_MAC if self.auth else 0
        lm_st32(h + O_SRC, <uint32_t>self.rank)
        lm_st64(h + O_TAG, tag)
        lm_st32(h + O_TID, tid)
        lm_st32(h + O_INDEX, index)
        lm_st32(h + O_COUNT, count)
        lm_st16(h + O_LENGTH, length)
        lm_st16(h + O_STRIDE, <uint16_t>self.stride)

    cdef void _mac_segments(self, int dst, uint8_t *hm, const uint8_t **spay, const uint32_t *slen,
                            int ns) noexcept nogil:
        """MAC of every segment of a send batch into its trailer."""
        cdef int i
        cdef size_t rec = HEADER_BYTES + MAC_BYTES
        for i in range(ns):
            lm_mac2(&self.keys[dst], hm + <size_t>i * rec, HEADER_BYTES, spay[i], slen[i],
                    hm + <size_t>i * rec + HEADER_BYTES)

    cdef int _job_alloc(self, SendJob *j) noexcept nogil:
        """The batch buffers of ``j``: 0, or -ENOMEM with nothing left allocated."""
        cdef int max_segs = SEND_MSGS * MAX_GSO_SEGS
        j.hm = <uint8_t *>malloc(<size_t>max_segs * (HEADER_BYTES + MAC_BYTES))
        j.iov = <iovec *>malloc(<size_t>max_segs * 3 * sizeof(iovec))
        j.msgs = <mmsghdr *>calloc(SEND_MSGS, sizeof(mmsghdr))
        j.ctrl = <char *>calloc(SEND_MSGS, LM_CTRL_BYTES)
        j.spay = <const uint8_t **>malloc(<size_t>max_segs * sizeof(uint8_t *))
        j.slen = <uint32_t *>malloc(<size_t>max_segs * sizeof(uint32_t))
        j.cbuf = NULL
        if j.corrupt:
            j.cbuf = <uint8_t *>malloc(<size_t>max_segs * self.stride + 1)
        if (j.hm == NULL or j.iov == NULL or j.msgs == NULL or j.ctrl == NULL or j.spay == NULL or j.slen == NULL
                or (j.corrupt and j.cbuf == NULL)):
            _job_free(j)
            return -12
        return 0

    cdef uint64_t _build_batch(self, SendJob *j, uint64_t pos, double rate_bps, uint64_t burst_bytes,
                               uint32_t grant) noexcept nogil:
        """Fill ``j``'s batch from send position ``pos``: up to SEND_MSGS messages of ``j.segs_per_msg`` segments,
        at most ``burst_bytes`` when paced, chunk indices below ``grant`` only. Returns the position after it."""
        cdef int k
        cdef uint32_t ci, plen
        cdef uint8_t *h
        cdef const uint8_t *payload
        cdef uint32_t stride = <uint32_t>self.stride
        j.nm = 0
        j.ns = 0
        j.batch_bytes = 0
        while j.nm < SEND_MSGS and pos < j.nidx:
            if rate_bps > 0 and j.batch_bytes > 0 and j.batch_bytes + j.seg_full > burst_bytes:
                break
            if (j.idx[pos] if j.idx != NULL else <uint32_t>pos) >= grant:
                break
            j.msgs[j.nm].msg_hdr.msg_name = &self.peers[j.dst]
            j.msgs[j.nm].msg_hdr.msg_namelen = sizeof(lm_addr)
            j.msgs[j.nm].msg_hdr.msg_iov = &j.iov[j.ns * 3]
            j.msgs[j.nm].msg_hdr.msg_control = NULL
            j.msgs[j.nm].msg_hdr.msg_controllen = 0
            j.msgs[j.nm].msg_hdr.msg_flags = 0
            k = 0
            while k < j.segs_per_msg and pos < j.nidx:
                ci = j.idx[pos] if j.idx != NULL else <uint32_t>pos
                if ci >= grant:
                    break
                plen = stride if ci + 1 < j.count else <uint32_t>(j.nbytes - <uint64_t>stride * (j.count - 1))
                # With GSO every segment but the last of a message must be full-sized.
                if k > 0 and <int>(HEADER_BYTES + plen + j.maclen) != j.seg_full:
                    break
                h = j.hm + <size_t>j.ns * (HEADER_BYTES + MAC_BYTES)
                self._put_header(h, K_DATA, j.dtype, j.tag, j.tid, ci, j.count, <uint16_t>plen)
                payload = j.base + <uint64_t>ci * stride if plen else h
                j.spay[j.ns] = payload
                j.slen[j.ns] = plen
                j.iov[j.ns * 3].iov_base = h
                j.iov[j.ns * 3].iov_len = HEADER_BYTES
                j.iov[j.ns * 3 + 1].iov_base = <void *>payload
                j.iov[j.ns * 3 + 1].iov_len = plen
                j.iov[j.ns * 3 + 2].iov_base = h + HEADER_BYTES
                j.iov[j.ns * 3 + 2].iov_len = j.maclen
                j.ns += 1
                k += 1
                pos += 1
                j.batch_bytes += HEADER_BYTES + plen + j.maclen
                if plen != stride:
                    break
            j.msgs[j.nm].msg_hdr.msg_iovlen = k * 3
            if j.segs_per_msg > 1 and k > 1:
                lm_msg_set_gso(&j.msgs[j.nm].msg_hdr, j.ctrl + <size_t>j.nm * LM_CTRL_BYTES, <uint16_t>j.seg_full)
            j.nm += 1
        return pos

    cdef void _seal_batch(self, SendJob *j) noexcept nogil:
        """MACs of the batch (four at a time), then the injected corruption (after the MAC)."""
        cdef int k
        cdef uint8_t *h
        if self.auth:
            self._mac_segments(j.dst, j.hm, j.spay, j.slen, j.ns)
        if not j.corrupt:
            return
        for k in range(j.ns):
            h = j.hm + <size_t>k * (HEADER_BYTES + MAC_BYTES)
            if j.slen[k]:
                memcpy(j.cbuf + <size_t>k * self.stride, j.spay[k], j.slen[k])
                j.cbuf[<size_t>k * self.stride + j.slen[k] // 2] ^= 0x10
                j.iov[k * 3 + 1].iov_base = j.cbuf + <size_t>k * self.stride
            elif self.auth:
                h[HEADER_BYTES] ^= 0x10
            else:
                h[O_TAG] ^= 0x10

    cdef int _flush_batch(self, SendJob *j) noexcept nogil:
        """Hand the batch to the kernel. Returns 0; 1 when the path refuses GSO (``self.gso`` is now off: rebuild
        the batch); or -errno."""
        cdef int done = 0, r, err
        while done < j.nm:
            r = sendmmsg(self.fd, j.msgs + done, j.nm - done, 0)
            if r >= 0:
                done += r
                continue
            err = lm_errno()
            if err == EINTR:
                continue
            if err == EAGAIN or err == EWOULDBLOCK:
                lm_wait_writable(self.fd, 10)
            elif err == ENOBUFS:
                lm_sleep_ns(50000)
            elif (err == EIO or err == EINVAL or err == EMSGSIZE) and j.segs_per_msg > 1:
                self.gso = False  # the path refuses GSO: one datagram per message from now on
                return 1
            elif err == EPERM or err == ECONNREFUSED:
                done += 1  # dropped by a local firewall rule or an ICMP error: the datagram is lost
            else:
                return -err
        return 0

    cdef uint32_t _wait_credit(self, Credit *c, uint32_t need, uint32_t step, uint32_t count) noexcept nogil:
        """Out of credit: sleep until the receiver grants chunk ``need`` (its grant wakes this thread), or until
        CREDIT_WAIT_NS pass without any new grant; then grant itself ``step`` chunks past ``need``, so lost credits
        or a receiver that never grants cost at most that wait per quarter window. Returns the grant."""
        cdef uint64_t now, end = lm_now_ns() + CREDIT_WAIT_NS
        cdef uint32_t g = lm_grant_load(&c.grant)
        cdef uint32_t seen = g
        while g <= need:
            now = lm_now_ns()
            if now >= end:
                self.credit_timeouts += 1
                lm_grant_raise(&c.grant, <uint32_t>min(<uint64_t>need + step, <uint64_t>count))
                return lm_grant_load(&c.grant)
            lm_grant_wait(&c.grant, g, end - now)
            g = lm_grant_load(&c.grant)
            if g != seen:  # the receiver is draining: wait afresh for the next grant
                seen = g
                end = lm_now_ns() + CREDIT_WAIT_NS
        return g

    cdef int64_t _send(self, SendJob *j, double rate_bps, uint64_t burst_bytes, uint32_t credit) noexcept nogil:
        """Send ``j``'s chunks in batches of up to SEND_MSGS sendmmsg messages (GSO when on), paced at ``rate_bps``
        with at most ``burst_bytes`` ahead of schedule, and within the receiver's grant when ``credit`` (a window
        in chunks) is > 0. Returns the datagrams sent, or -errno."""
        cdef uint64_t pos = 0, start, sent = 0, sent_bytes = 0, t0, now, due
        cdef double ns_per_byte = 0.0
        cdef int r = 0
        cdef uint32_t grant = 0xFFFFFFFF, ci
        cdef Credit *c = &self.credit[j.dst]
        j.maclen = MAC_BYTES if self.auth else 0
        j.seg_full = HEADER_BYTES + self.stride + j.maclen
        if rate_bps > 0:
            ns_per_byte = 8e9 / rate_bps
            if burst_bytes == 0:
                burst_bytes = 256 * 1024
        if credit > 0:  # open this message's grant: the first window needs none
            lm_grant_store(&c.open, 0)
            c.tag = j.tag
            c.tid = j.tid
            lm_grant_store(&c.grant, credit)
            lm_grant_store(&c.open, 1)
        t0 = lm_now_ns()
        while pos < j.nidx:
            j.segs_per_msg = 1
            if self.gso and not j.corrupt:
                j.segs_per_msg = max(1, min(MAX_GSO_SEGS, GSO_MAX_BYTES // j.seg_full))
            if credit > 0:
                grant = lm_grant_load(&c.grant)
                ci = j.idx[pos] if j.idx != NULL else <uint32_t>pos
                if ci >= grant:
                    grant = self._wait_credit(c, ci, max(1, credit >> 2), j.count)
            start = pos
            pos = self._build_batch(j, pos, rate_bps, burst_bytes, grant)
            self._seal_batch(j)
            if rate_bps > 0:  # pace: wait until this batch fits in the token bucket
                due = t0 + <uint64_t>(sent_bytes * ns_per_byte)
                now = lm_now_ns()
                if due > now + <uint64_t>(burst_bytes * ns_per_byte):
                    lm_sleep_ns(due - now - <uint64_t>(burst_bytes * ns_per_byte))
            r = self._flush_batch(j)
            if r < 0:
                break
            if r == 1:  # rewind to the first chunk of this batch and rebuild it without GSO
                pos = start
                continue
            sent += j.ns
            sent_bytes += j.batch_bytes
        if credit > 0:
            lm_grant_store(&c.open, 0)
        if r < 0:
            return r
        return <int64_t>sent
