/*
 * NLM v4 / NSM test client built on libnfs's raw RPC API (Debian libnfs-dev).
 *
 *   nlm_client HOST PORT FH_HEX
 *
 * Connects to HOST:PORT (storaged serves NFS, MOUNT, NLM and NSM on one
 * listener) and runs a fixed script of NLM4 TEST / LOCK / UNLOCK calls from two
 * lock owners on two "hosts", then NSM SM_STAT and SM_NOTIFY.  Each step prints
 * one line "name status [details]" for tests/test_nfs_nlm_peers.py to check.
 * Built by that test with gcc; it carries no assertions itself.
 */
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include <nfsc/libnfs.h>
#include <nfsc/libnfs-raw.h>
#include <nfsc/libnfs-raw-nlm.h>
#include <nfsc/libnfs-raw-nsm.h>

struct waiter {
	int done;
	int status;
	char line[512];
};

static struct rpc_context *rpc;
static char fh[64];
static int fh_len;

static void run(struct waiter *w)
{
	while (!w->done) {
		struct pollfd pfd = { rpc_get_fd(rpc), rpc_which_events(rpc), 0 };
		if (poll(&pfd, 1, 5000) <= 0) {
			printf("error timeout\n");
			exit(2);
		}
		if (rpc_service(rpc, pfd.revents) < 0) {
			printf("error service %s\n", rpc_get_error(rpc));
			exit(2);
		}
	}
}

static void connect_cb(struct rpc_context *r, int status, void *data, void *priv)
{
	struct waiter *w = priv;
	w->status = status;
	w->done = 1;
}

static void lock_cb(struct rpc_context *r, int status, void *data, void *priv)
{
	struct waiter *w = priv;
	w->done = 1;
	w->status = status;
	if (status == RPC_STATUS_SUCCESS)
		w->status = ((NLM4_LOCKres *)data)->status;
	else
		w->status = 100 + status;
}

static void test_cb(struct rpc_context *r, int status, void *data, void *priv)
{
	struct waiter *w = priv;
	NLM4_TESTres *res = data;
	w->done = 1;
	if (status != RPC_STATUS_SUCCESS) {
		w->status = 100 + status;
		return;
	}
	w->status = res->reply.status;
	if (res->reply.status == NLM4_DENIED) {
		nlm4_holder *h = &res->reply.nlm4_testreply_u.lock.holder;
		snprintf(w->line, sizeof(w->line), "exclusive=%u svid=%u oh=%s offset=%llu len=%llu",
			 h->exclusive, h->svid, h->oh, (unsigned long long)h->l_offset,
			 (unsigned long long)h->l_len);
	}
}

static void stat_cb(struct rpc_context *r, int status, void *data, void *priv)
{
	struct waiter *w = priv;
	w->done = 1;
	if (status != RPC_STATUS_SUCCESS) {
		w->status = 100 + status;
		return;
	}
	w->status = ((NSM1_STATres *)data)->res;
	snprintf(w->line, sizeof(w->line), "state=%d", ((NSM1_STATres *)data)->state);
}

static void void_cb(struct rpc_context *r, int status, void *data, void *priv)
{
	struct waiter *w = priv;
	w->done = 1;
	w->status = status == RPC_STATUS_SUCCESS ? 0 : 100 + status;
}

static nlm4_lock make_lock(char *host, char *oh, unsigned svid, uint64_t off, uint64_t len)
{
	nlm4_lock l;
	l.caller_name = host;
	l.fh.data.data_len = fh_len;
	l.fh.data.data_val = fh;
	l.oh = oh;
	l.svid = svid;
	l.l_offset = off;
	l.l_len = len;
	return l;
}

static char cookie[] = "ck01";

static void do_lock(const char *name, char *host, char *oh, unsigned svid, int excl,
		    uint64_t off, uint64_t len)
{
	struct waiter w = { 0 };
	NLM4_LOCKargs a;
	memset(&a, 0, sizeof(a));
	a.cookie.data.data_len = 4;
	a.cookie.data.data_val = cookie;
	a.block = 0;
	a.exclusive = excl;
	a.lock = make_lock(host, oh, svid, off, len);
	a.reclaim = 0;
	a.state = 1;
	if (rpc_nlm4_lock_async(rpc, lock_cb, &a, &w) != 0) {
		printf("error send %s\n", name);
		exit(2);
	}
	run(&w);
	printf("%s %d\n", name, w.status);
}

static void do_test(const char *name, char *host, char *oh, unsigned svid, int excl,
		    uint64_t off, uint64_t len)
{
	struct waiter w = { 0 };
	NLM4_TESTargs a;
	memset(&a, 0, sizeof(a));
	a.cookie.data.data_len = 4;
	a.cookie.data.data_val = cookie;
	a.exclusive = excl;
	a.lock = make_lock(host, oh, svid, off, len);
	if (rpc_nlm4_test_async(rpc, test_cb, &a, &w) != 0) {
		printf("error send %s\n", name);
		exit(2);
	}
	run(&w);
	printf("%s %d %s\n", name, w.status, w.line);
}

static void do_unlock(const char *name, char *host, char *oh, unsigned svid,
		      uint64_t off, uint64_t len)
{
	struct waiter w = { 0 };
	NLM4_UNLOCKargs a;
	memset(&a, 0, sizeof(a));
	a.cookie.data.data_len = 4;
	a.cookie.data.data_val = cookie;
	a.lock = make_lock(host, oh, svid, off, len);
	if (rpc_nlm4_unlock_async(rpc, lock_cb, &a, &w) != 0) {
		printf("error send %s\n", name);
		exit(2);
	}
	run(&w);
	printf("%s %d\n", name, w.status);
}

int main(int argc, char **argv)
{
	struct waiter w = { 0 };
	if (argc != 4) {
		fprintf(stderr, "usage: %s HOST PORT FH_HEX\n", argv[0]);
		return 1;
	}
	fh_len = strlen(argv[3]) / 2;
	if (fh_len > (int)sizeof(fh))
		return 1;
	for (int i = 0; i < fh_len; i++)
		sscanf(argv[3] + 2 * i, "%2hhx", &fh[i]);
	rpc = rpc_init_context();
	if (rpc == NULL || rpc_connect_async(rpc, argv[1], atoi(argv[2]), connect_cb, &w) != 0) {
		printf("error connect\n");
		return 2;
	}
	run(&w);
	if (w.status != RPC_STATUS_SUCCESS) {
		printf("error connect %s\n", rpc_get_error(rpc));
		return 2;
	}
	char ha[] = "client-a", hb[] = "client-b", oa[] = "owner-a", ob[] = "owner-b";

	do_test("test_free", ha, oa, 11, 1, 0, 100);
	do_lock("lock_a", ha, oa, 11, 1, 0, 100);           /* exclusive 0..99 */
	do_lock("lock_b_conflict", hb, ob, 22, 1, 50, 10);  /* overlaps: DENIED */
	do_test("test_b", hb, ob, 22, 0, 90, 0);            /* shared 90..EOF: holder a */
	do_lock("lock_b_beyond", hb, ob, 22, 0, 100, 0);    /* shared 100..EOF: no overlap */
	do_lock("lock_a_eof", ha, oa, 11, 1, 200, 1);       /* inside b's EOF lock: DENIED */
	do_unlock("unlock_a_part", ha, oa, 11, 0, 50);      /* a keeps 50..99 */
	do_lock("lock_b_head", hb, ob, 22, 1, 0, 50);       /* now free: GRANTED */
	do_lock("lock_b_mid", hb, ob, 22, 1, 60, 1);        /* still a's: DENIED */

	struct waiter s = { 0 };
	NSM1_STATargs sa = { hb };
	if (rpc_nsm1_stat_async(rpc, stat_cb, &sa, &s) != 0)
		return 2;
	run(&s);
	printf("sm_stat %d %s\n", s.status, s.line);

	struct waiter n = { 0 };
	NSM1_NOTIFYargs na = { hb, 3 };                     /* client-b "rebooted" */
	if (rpc_nsm1_notify_async(rpc, void_cb, &na, &n) != 0)
		return 2;
	run(&n);
	printf("sm_notify %d\n", n.status);
	do_test("test_after_notify", ha, oa, 11, 1, 0, 0);  /* b's locks are gone */
	do_lock("lock_a_all", ha, oa, 11, 1, 0, 0);
	do_unlock("unlock_a_all", ha, oa, 11, 0, 0);
	rpc_destroy_context(rpc);
	printf("done\n");
	return 0;
}
