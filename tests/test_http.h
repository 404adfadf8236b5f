/* One HTTP/1.1 request over loopback for the server tests (header-only, as
 * test_util.h). */
#ifndef DSI_TEST_HTTP_H
#define DSI_TEST_HTTP_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* One request with Connection: close (and an Authorization header when
 * `key` is set); the whole response, malloc'ed, or NULL. */
static inline char *test_http(int port, const char *method, const char *path, const char *key, const char *body) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return NULL; }
    char req[1024], auth[256] = "";
    if (key) snprintf(auth, sizeof auth, "Authorization: Bearer %s\r\n", key);
    size_t blen = body ? strlen(body) : 0;
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%sContent-Length: %zu\r\n\r\n",
                     method, path, auth, blen);
    if (send(fd, req, n, 0) != n || (blen && send(fd, body, blen, 0) != (ssize_t)blen)) { close(fd); return NULL; }
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap);
    ssize_t k;
    while ((k = recv(fd, out + len, cap - 1 - len, 0)) > 0) {
        len += k;
        if (len + 1 == cap) out = realloc(out, cap *= 2);
    }
    out[len] = 0;
    close(fd);
    return out;
}

#endif
