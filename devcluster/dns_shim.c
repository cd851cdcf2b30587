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
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
