/* KV transfer wire: blocking TCP helpers with deadlines, message framing. */
#include "dsinfer/pd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int dsi_pd_split_hostport(const char *s, char *host, size_t cap, int *port) {
    if (!s) return dsi_error(DSI_EINVAL, "no address");
    if (!strncmp(s, "http://", 7)) s += 7;
    const char *colon;
    size_t hl;
    if (*s == '[') {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':') return dsi_error(DSI_EINVAL, "bad address '%s'", s);
        s++;
        hl = end - s;
        colon = end + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon) return dsi_error(DSI_EINVAL, "address '%s' has no port", s);
        hl = colon - s;
    }
    char *e;
    long p = strtol(colon + 1, &e, 10);
    if (e == colon + 1 || (*e && *e != '/') || p <= 0 || p > 65535 || hl == 0 || hl >= cap)
        return dsi_error(DSI_EINVAL, "bad address '%s'", s);
    memcpy(host, s, hl);
    host[hl] = 0;
    *port = (int)p;
    return DSI_OK;
}

int dsi_pd_connect(const char *host, int port, double timeout_s, int *fd_out) {
    *fd_out = -1;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int e = getaddrinfo(host, ps, &hints, &res);
    if (e) return dsi_error(DSI_EINVAL, "cannot resolve '%s': %s", host, gai_strerror(e));
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { freeaddrinfo(res); return dsi_error(DSI_EIO, "socket: %s", strerror(errno)); }
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    int rc = connect(fd, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    if (rc < 0 && errno != EINPROGRESS) {
        int err = errno;
        close(fd);
        return dsi_error(DSI_EPEER, "connect %s:%d: %s", host, port, strerror(err));
    }
    if (rc < 0) {
        struct pollfd pf = {.fd = fd, .events = POLLOUT};
        int pr = poll(&pf, 1, (int)(timeout_s * 1000));
        int err = 0;
        socklen_t el = sizeof err;
        if (pr <= 0) { close(fd); return dsi_error(DSI_ETIMEOUT, "connect %s:%d: timed out", host, port); }
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) { close(fd); return dsi_error(DSI_EPEER, "connect %s:%d: %s", host, port, strerror(err)); }
    }
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    *fd_out = fd;
    return DSI_OK;
}

int dsi_pd_listen(const char *host, int port, int *fd_out, int *bound_port) {
    *fd_out = -1;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res = NULL;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int e = getaddrinfo(host, ps, &hints, &res);
    if (e) return dsi_error(DSI_EINVAL, "cannot resolve '%s': %s", host, gai_strerror(e));
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 128) < 0) {
        int err = errno;
        if (fd >= 0) close(fd);
        freeaddrinfo(res);
        return dsi_error(DSI_EIO, "cannot listen on %s:%d: %s", host, port, strerror(err));
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    *bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
    *fd_out = fd;
    return DSI_OK;
}

int dsi_pd_send_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return dsi_error(DSI_EPEER, "send: %s", k < 0 ? strerror(errno) : "closed");
        p += k;
        n -= k;
    }
    return DSI_OK;
}

int dsi_pd_recv_all(int fd, void *buf, size_t n, double timeout_s) {
    char *p = buf;
    double end = dsi_now() + timeout_s;
    while (n > 0) {
        /* take what is there first: poll only when the socket is empty */
        ssize_t k = recv(fd, p, n, MSG_DONTWAIT);
        if (k > 0) {
            p += k;
            n -= k;
            continue;
        }
        if (k == 0) return dsi_error(DSI_EPEER, "recv: peer closed the connection");
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return dsi_error(DSI_EPEER, "recv: %s", strerror(errno));
        double left = end - dsi_now();
        if (left <= 0) return dsi_error(DSI_ETIMEOUT, "recv: timed out");
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        int pr = poll(&pf, 1, (int)(left * 1000) + 1);
        if (pr < 0 && errno == EINTR) continue;
    }
    return DSI_OK;
}

typedef struct wire_hdr {
    uint32_t magic, type;
    uint64_t len;
} wire_hdr;

int dsi_pd_send_msg(int fd, uint32_t type, const void *hdr, size_t hdr_len, const void *payload, size_t payload_len) {
    wire_hdr h = {DSI_PD_MAGIC, type, hdr_len + payload_len};
    /* header and fixed part in one write: small messages go out as one segment */
    char small[256];
    if (hdr_len <= sizeof small - sizeof h) {
        memcpy(small, &h, sizeof h);
        if (hdr_len) memcpy(small + sizeof h, hdr, hdr_len);
        int rc = dsi_pd_send_all(fd, small, sizeof h + hdr_len);
        if (rc) return rc;
    } else {
        int rc = dsi_pd_send_all(fd, &h, sizeof h);
        if (!rc) rc = dsi_pd_send_all(fd, hdr, hdr_len);
        if (rc) return rc;
    }
    return payload_len ? dsi_pd_send_all(fd, payload, payload_len) : DSI_OK;
}

int dsi_pd_recv_hdr(int fd, uint32_t *type, uint64_t *len, double timeout_s) {
    wire_hdr h;
    int rc = dsi_pd_recv_all(fd, &h, sizeof h, timeout_s);
    if (rc) return rc;
    if (h.magic != DSI_PD_MAGIC) return dsi_error(DSI_EFORMAT, "kv transfer: bad magic 0x%08x", h.magic);
    *type = h.type;
    *len = h.len;
    return DSI_OK;
}
