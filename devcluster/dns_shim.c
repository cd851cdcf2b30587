/* Cluster DNS for processes of the mmalign process node, as an LD_PRELOAD library.
 *
 * Why: pods run as plain local processes, with no cluster DNS server and no /etc/hosts of their own,
 * yet torch's c10d and gloo (C++) resolve peer pod names with libc's getaddrinfo. A Python-level patch
 * would miss them, so this library wraps the libc resolver entry points.
 *
 * Environment (set by the process node for every container):
 *   MMALIGN_HOSTS_FILE  hosts file kept current by the node ("IP name name ..."); re-read at every
 *                       lookup, so names of pods that start later resolve without restarting anything
 *   MMALIGN_DNS_SEARCH  space-separated search domains ("ns.svc.cluster.local svc.cluster.local ...")
 *   MMALIGN_HOSTNAME    the pod's hostname: returned by gethostname()/uname() and resolved to ...
 *   MMALIGN_POD_IP      ... the pod's own loopback address
 * A name not found falls through to the real resolver (localhost, real hosts).
 * Like resolv.conf's "ndots:5", names with fewer than five dots try the search domains first.
 *
 * Ports: pods share the host's port space, so two pods listening on 0.0.0.0:29500 (two torchrun
 * masters) would collide. A bind() to the wildcard address therefore binds the pod's own address
 * instead (IPv6 "::" becomes ::ffff:<pod IP> on dual-stack sockets), and a connect() to 127.0.0.1/::1
 * where nothing listens on loopback but the pod listens on its own address goes to the pod's address,
 * so "localhost" still reaches the pod's own listeners.
 * MMALIGN_KEEP_WILDCARD=1 turns this off.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/utsname.h>

#define MAX_IPS 16
#define IP_LEN 64

/* Append the addresses that `name` has in the hosts file to ips; returns the new count. */
static int hosts_lookup(const char *name, char ips[][IP_LEN], int count) {
    const char *path = getenv("MMALIGN_HOSTS_FILE");
    if (!path || !*path) return count;
    FILE *f = fopen(path, "re");
    if (!f) return count;
    char line[4096];
    while (count < MAX_IPS && fgets(line, sizeof line, f)) {
        char *save = NULL;
        char *ip = strtok_r(line, " \t\r\n", &save);
        if (!ip || ip[0] == '#') continue;
        for (char *tok = strtok_r(NULL, " \t\r\n", &save); tok; tok = strtok_r(NULL, " \t\r\n", &save)) {
            if (strcasecmp(tok, name) == 0) {
                snprintf(ips[count++], IP_LEN, "%s", ip);
                break;
            }
        }
    }
    fclose(f);
    return count;
}

/* All cluster addresses of a name, 0 when it is not a cluster name. */
static int cluster_resolve(const char *node, char ips[][IP_LEN]) {
    if (!node || !*node) return 0;
    char name[512];
    snprintf(name, sizeof name, "%s", node);
    size_t len = strlen(name);
    if (len && name[len - 1] == '.') name[--len] = '\0';  /* absolute name: no search */
    else {
        const char *host = getenv("MMALIGN_HOSTNAME"), *own_ip = getenv("MMALIGN_POD_IP");
        if (host && own_ip && strcasecmp(name, host) == 0) {
            snprintf(ips[0], IP_LEN, "%s", own_ip);
            return 1;
        }
        int dots = 0;
        for (const char *p = name; *p; p++) dots += (*p == '.');
        const char *search = getenv("MMALIGN_DNS_SEARCH");
        if (dots < 5 && search) {
            char domains[1024];
            snprintf(domains, sizeof domains, "%s", search);
            char *save = NULL;
            for (char *d = strtok_r(domains, " ", &save); d; d = strtok_r(NULL, " ", &save)) {
                char fqdn[1024];
                snprintf(fqdn, sizeof fqdn, "%s.%s", name, d);
                int n = hosts_lookup(fqdn, ips, 0);
                if (n) return n;
            }
        }
    }
    return hosts_lookup(name, ips, 0);
}

typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    static getaddrinfo_fn real;
    if (!real) real = (getaddrinfo_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    char ips[MAX_IPS][IP_LEN];
    int n = cluster_resolve(node, ips);
    if (n == 0) return real(node, service, hints, res);
    struct addrinfo numeric = {0};
    if (hints) numeric = *hints;
    numeric.ai_flags |= AI_NUMERICHOST;
    numeric.ai_flags &= ~AI_CANONNAME;
    struct addrinfo *head = NULL, **tail = &head;
    int first_error = 0;
    for (int i = 0; i < n; i++) {
        struct addrinfo *part = NULL;
        int rc = real(ips[i], service, &numeric, &part);
        if (rc != 0) {
            if (!first_error) first_error = rc;
            continue;
        }
        *tail = part;  /* glibc's freeaddrinfo frees node by node, so lists may be chained */
        while (*tail) tail = &(*tail)->ai_next;
    }
    if (!head) return first_error ? first_error : EAI_NONAME;
    *res = head;
    return 0;
}

/* The legacy resolvers: hand the real function the cluster address as a numeric name. */
#define RESOLVE_FIRST(name, buf) \
    char buf##_ips[MAX_IPS][IP_LEN]; \
    const char *buf = cluster_resolve(name, buf##_ips) ? buf##_ips[0] : name

struct hostent *gethostbyname(const char *name) {
    static struct hostent *(*real)(const char *);
    if (!real) real = dlsym(RTLD_NEXT, "gethostbyname");
    RESOLVE_FIRST(name, use);
    return real(use);
}

struct hostent *gethostbyname2(const char *name, int af) {
    static struct hostent *(*real)(const char *, int);
    if (!real) real = dlsym(RTLD_NEXT, "gethostbyname2");
    RESOLVE_FIRST(name, use);
    return real(use, af);
}

int gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen,
                    struct hostent **result, int *h_errnop) {
    static int (*real)(const char *, struct hostent *, char *, size_t, struct hostent **, int *);
    if (!real) real = dlsym(RTLD_NEXT, "gethostbyname_r");
    RESOLVE_FIRST(name, use);
    return real(use, ret, buf, buflen, result, h_errnop);
}

int gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf, size_t buflen,
                     struct hostent **result, int *h_errnop) {
    static int (*real)(const char *, int, struct hostent *, char *, size_t, struct hostent **, int *);
    if (!real) real = dlsym(RTLD_NEXT, "gethostbyname2_r");
    RESOLVE_FIRST(name, use);
    return real(use, af, ret, buf, buflen, result, h_errnop);
}

int gethostname(char *name, size_t len) {
    const char *host = getenv("MMALIGN_HOSTNAME");
    if (host && *host) {
        snprintf(name, len, "%s", host);
        return 0;
    }
    static int (*real)(char *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "gethostname");
    return real(name, len);
}

int uname(struct utsname *buf) {
    static int (*real)(struct utsname *);
    if (!real) real = dlsym(RTLD_NEXT, "uname");
    int rc = real(buf);
    const char *host = getenv("MMALIGN_HOSTNAME");
    if (rc == 0 && host && *host) snprintf(buf->nodename, sizeof buf->nodename, "%s", host);
    return rc;
}

/* The pod's address as IPv4 (and IPv4-mapped IPv6); 0 when ports are not per pod. */
static int pod_address(struct in_addr *v4) {
    const char *ip = getenv("MMALIGN_POD_IP"), *keep = getenv("MMALIGN_KEEP_WILDCARD");
    if (!ip || !*ip || (keep && *keep == '1')) return 0;
    return inet_pton(AF_INET, ip, v4) == 1;
}

static void mapped(struct in6_addr *out, struct in_addr v4) {
    memset(out, 0, sizeof *out);
    out->s6_addr[10] = out->s6_addr[11] = 0xff;
    memcpy(&out->s6_addr[12], &v4, 4);
}

static int dual_stack(int fd) {
    int v6only = 1;
    socklen_t len = sizeof v6only;
    return getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) == 0 && !v6only;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "bind");
    struct in_addr pod;
    if (addr && pod_address(&pod)) {
        if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
            struct sockaddr_in a = *(const struct sockaddr_in *)addr;
            if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
                a.sin_addr = pod;
                return real(fd, (struct sockaddr *)&a, sizeof a);
            }
        } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
            struct sockaddr_in6 a = *(const struct sockaddr_in6 *)addr;
            if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr) && dual_stack(fd)) {
                mapped(&a.sin6_addr, pod);
                return real(fd, (struct sockaddr *)&a, sizeof a);
            }
        }
    }
    return real(fd, addr, len);
}

/* Is a TCP socket listening on this address? Read from /proc/net/tcp{,6}: no side effects, unlike a
 * probe connection, and it answers at once for non-blocking sockets too. */
static int listening_v4(struct in_addr addr, unsigned port) {
    char key[32];
    snprintf(key, sizeof key, "%08X:%04X", (unsigned)addr.s_addr, port);
    FILE *f = fopen("/proc/net/tcp", "re");
    if (!f) return 0;
    char line[512], local[64], state[8];
    int found = 0;
    while (!found && fgets(line, sizeof line, f))
        if (sscanf(line, " %*s %63s %*s %7s", local, state) == 2)
            found = strcmp(state, "0A") == 0 && strcasecmp(local, key) == 0;
    fclose(f);
    return found;
}

static int listening_v6(const struct in6_addr *addr, unsigned port) {
    unsigned int words[4];
    memcpy(words, addr, sizeof words);
    char key[64];
    snprintf(key, sizeof key, "%08X%08X%08X%08X:%04X", words[0], words[1], words[2], words[3], port);
    FILE *f = fopen("/proc/net/tcp6", "re");
    if (!f) return 0;
    char line[512], local[80], state[8];
    int found = 0;
    while (!found && fgets(line, sizeof line, f))
        if (sscanf(line, " %*s %79s %*s %7s", local, state) == 2)
            found = strcmp(state, "0A") == 0 && strcasecmp(local, key) == 0;
    fclose(f);
    return found;
}

/* Someone answers on 127.0.0.1:port for real (a loopback or host-wide wildcard listener)? */
static int loopback_answers(unsigned port) {
    struct in_addr loop = {htonl(INADDR_LOOPBACK)}, any = {htonl(INADDR_ANY)};
    struct in6_addr loop6 = IN6ADDR_LOOPBACK_INIT, any6 = IN6ADDR_ANY_INIT, loop_mapped;
    mapped(&loop_mapped, loop);
    return listening_v4(loop, port) || listening_v4(any, port) || listening_v6(&loop6, port)
        || listening_v6(&any6, port) || listening_v6(&loop_mapped, port);
}

static int pod_answers(struct in_addr pod, unsigned port) {
    struct in6_addr pod_mapped;
    mapped(&pod_mapped, pod);
    return listening_v4(pod, port) || listening_v6(&pod_mapped, port);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "connect");
    struct in_addr pod, loop = {htonl(INADDR_LOOPBACK)};
    if (!addr || !pod_address(&pod)) return real(fd, addr, len);
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a = *(const struct sockaddr_in *)addr;
        unsigned port = ntohs(a.sin_port);
        if (a.sin_addr.s_addr == loop.s_addr && !loopback_answers(port) && pod_answers(pod, port)) {
            a.sin_addr = pod;
            return real(fd, (struct sockaddr *)&a, sizeof a);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a = *(const struct sockaddr_in6 *)addr;
        struct in6_addr loop_mapped;
        mapped(&loop_mapped, loop);
        unsigned port = ntohs(a.sin6_port);
        int is_loop = IN6_IS_ADDR_LOOPBACK(&a.sin6_addr) || !memcmp(&a.sin6_addr, &loop_mapped, sizeof loop_mapped);
        if (is_loop && !loopback_answers(port) && pod_answers(pod, port)) {
            mapped(&a.sin6_addr, pod);
            return real(fd, (struct sockaddr *)&a, sizeof a);
        }
    }
    return real(fd, addr, len);
}
