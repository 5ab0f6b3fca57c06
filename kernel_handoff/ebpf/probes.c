/*
 * The iSCSI kernel handoff as the kernel sees it, for bcc (kernel_handoff/ebpf/observer.py).
 *
 * Every probe fills one struct event_t and sends it up a perf buffer; events.py decodes it.
 * The uevent itself travels raw (56 bytes as the sender wrote them) and is decoded in
 * Python, so what the timeline shows is what the kernel received, not our reading of it.
 * Changing struct event_t means changing events.py: tests/kernel_handoff/ebpf reads this
 * struct from this file and fails when they disagree.
 *
 * Tracepoint handlers are appended by observer.py, one per iscsi:* tracepoint the running
 * kernel has (bcc reads each format file while compiling, so a missing one cannot be
 * named here).
 */
#include <uapi/linux/ptrace.h>
#include <linux/skbuff.h>
#include <linux/netlink.h>
#include <linux/sched.h>
#include <linux/fdtable.h>
#include <linux/net.h>
#include <net/sock.h>
#include <scsi/iscsi_if.h>
#include <scsi/scsi_transport_iscsi.h>
#include <scsi/libiscsi.h>

#define UEVENT_SIZE 56
#define DEV_MAX 32
#define TEXT_MAX 224

/* events.py reads the uevent at these offsets: the kernel's own header must agree. */
_Static_assert(sizeof(struct iscsi_uevent) == UEVENT_SIZE, "struct iscsi_uevent size");
_Static_assert(offsetof(struct iscsi_uevent, u) == 16, "iscsi_uevent.u offset");
_Static_assert(offsetof(struct iscsi_uevent, r) == 40, "iscsi_uevent.r offset");
_Static_assert(offsetof(struct iscsi_uevent, u.b_conn.transport_eph) == 24,
	       "b_conn.transport_eph offset");
_Static_assert(offsetof(struct iscsi_uevent, u.b_conn.is_leading) == 32,
	       "b_conn.is_leading offset");
_Static_assert(offsetof(struct iscsi_uevent, u.set_param.param) == 24,
	       "set_param.param offset");
_Static_assert(offsetof(struct iscsi_uevent, u.set_param.len) == 28, "set_param.len offset");
_Static_assert(offsetof(struct iscsi_uevent, u.stop_conn.flag) == 32, "stop_conn.flag offset");
_Static_assert(offsetof(struct iscsi_uevent, u.c_session.cmds_max) == 20,
	       "c_session.cmds_max offset");
_Static_assert(ISCSI_UEVENT_SET_PARAM == 16 && ISCSI_PARAM_PASSWORD == 24 &&
	       ISCSI_PARAM_PASSWORD_IN == 25, "codes.py numbers");

enum event_kind {
	KIND_UEVENT = 1,	/* iscsi_if_rx: a request arrived on NETLINK_ISCSI */
	KIND_BIND = 2,		/* iscsi_sw_tcp_conn_bind entry: the fd handed over */
	KIND_BIND_RET = 3,	/* ... and what it returned */
	KIND_CONN_START = 4,	/* iscsi_conn_start entry */
	KIND_CONN_START_RET = 5,
	KIND_CONN_STOP = 6,	/* iscsi_conn_stop(cls_conn, flag) */
	KIND_CONN_FAILURE = 7,	/* iscsi_conn_failure(conn, err): libiscsi saw it fail */
	KIND_CONN_ERROR = 8,	/* iscsi_conn_error_event: the CONN_ERROR sent to userland */
	KIND_TRACEPOINT = 9,	/* an iscsi:* debug tracepoint */
};

struct event_t {
	u64 ts_ns;		/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	u32 pid;		/* thread group id */
	u32 tid;
	char comm[16];
	u32 kind;		/* enum event_kind */
	s32 sid;		/* -1 when the probe cannot know it */
	s32 cid;
	s32 value;		/* is_leading, stop flag, iscsi_err, a return value, tracepoint id */
	u64 value64;		/* transport_eph: the socket fd for iscsi_tcp */
	u32 nlmsg_len;
	u16 nlmsg_type;
	u16 nlmsg_flags;
	u32 uevent_len;		/* bytes of uevent[] filled: 0 or UEVENT_SIZE */
	s32 text_len;		/* bpf_probe_read_kernel_str's result for text[]; 0: none */
	u16 family;		/* bind: the socket behind the fd; 0 when it is none */
	u16 lport;		/* host order */
	u16 dport;		/* host order */
	u16 pad;
	u8 saddr[16];		/* 4 bytes for AF_INET */
	u8 daddr[16];
	u8 uevent[UEVENT_SIZE];
	char dev[DEV_MAX];	/* tracepoints: the device name (session1, connection1:0) */
	char text[TEXT_MAX];	/* SET_PARAM's value, a tracepoint's message */
};

BPF_PERF_OUTPUT(events);
/* struct event_t is too big for the 512-byte BPF stack: build it in a per-CPU slot. */
BPF_PERCPU_ARRAY(scratch, struct event_t, 1);

struct conn_ids {
	s32 sid;
	s32 cid;
};
/* sid/cid seen at a function's entry, for its kretprobe (keyed by thread). */
BPF_HASH(pending, u64, struct conn_ids, 1024);

static __always_inline struct event_t *new_event(u32 kind)
{
	u32 zero = 0;
	struct event_t *e = scratch.lookup(&zero);
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	u64 pid_tgid = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = pid_tgid >> 32;
	e->tid = (u32)pid_tgid;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	e->kind = kind;
	e->sid = -1;
	e->cid = -1;
	return e;
}

/* The session is the parent device of the connection (iscsi_conn_to_session). */
static __always_inline void read_conn_ids(struct iscsi_cls_conn *conn, struct conn_ids *ids)
{
	u32 cid = 0;
	int sid = -1;
	struct device *parent = 0;

	ids->sid = -1;
	ids->cid = -1;
	if (!conn)
		return;
	bpf_probe_read_kernel(&cid, sizeof(cid), &conn->cid);
	bpf_probe_read_kernel(&parent, sizeof(parent), &conn->dev.parent);
	if (parent)
		bpf_probe_read_kernel(&sid, sizeof(sid),
				      (char *)parent - offsetof(struct iscsi_cls_session, dev) +
				      offsetof(struct iscsi_cls_session, sid));
	ids->sid = sid;
	ids->cid = cid;
}

/*
 * iscsi_if_rx(skb) runs in the sender's context for every NETLINK_ISCSI request; the
 * skb's data is the netlink header then struct iscsi_uevent then the tail. Only the first
 * message is read: an skb may carry several, but iscsid and we send one per sendmsg.
 */
int probe_iscsi_if_rx(struct pt_regs *ctx, struct sk_buff *skb)
{
	struct event_t *e = new_event(KIND_UEVENT);
	unsigned char *data = 0;
	unsigned int len = 0;
	struct nlmsghdr nlh = {};

	if (!e)
		return 0;
	bpf_probe_read_kernel(&data, sizeof(data), &skb->data);
	bpf_probe_read_kernel(&len, sizeof(len), &skb->len);
	if (!data || len < NLMSG_HDRLEN)
		return 0;
	bpf_probe_read_kernel(&nlh, sizeof(nlh), data);
	e->nlmsg_len = nlh.nlmsg_len;
	e->nlmsg_type = nlh.nlmsg_type;
	e->nlmsg_flags = nlh.nlmsg_flags;
	if (len >= NLMSG_HDRLEN + UEVENT_SIZE) {
		bpf_probe_read_kernel(e->uevent, UEVENT_SIZE, data + NLMSG_HDRLEN);
		e->uevent_len = UEVENT_SIZE;
	}
	if (e->uevent_len && nlh.nlmsg_type == ISCSI_UEVENT_SET_PARAM &&
	    len > NLMSG_HDRLEN + UEVENT_SIZE) {
		u32 param = *(u32 *)(e->uevent + offsetof(struct iscsi_uevent, u.set_param.param));
		/* secrets never leave the kernel: text_len stays 0 */
		if (param != ISCSI_PARAM_PASSWORD && param != ISCSI_PARAM_PASSWORD_IN)
			e->text_len = bpf_probe_read_kernel_str(e->text, sizeof(e->text),
							       data + NLMSG_HDRLEN + UEVENT_SIZE);
	}
	events.perf_submit(ctx, e, sizeof(*e));
	return 0;
}

/*
 * The TCP socket behind the sender's fd, as iscsi_sw_tcp_conn_bind's sockfd_lookup will
 * find it: current->files->fdt->fd[fd]->private_data. A socket's file and its struct
 * socket point at each other; anything else leaves family 0.
 */
static __always_inline void read_socket(u64 fd, struct event_t *e)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct files_struct *files = 0;
	struct fdtable *fdt = 0;
	struct file **fds = 0;
	struct file *file = 0, *back = 0;
	struct socket *sock = 0;
	struct sock *sk = 0;
	unsigned int max_fds = 0;
	u16 family = 0, dport = 0;

	bpf_probe_read_kernel(&files, sizeof(files), &task->files);
	if (!files)
		return;
	bpf_probe_read_kernel(&fdt, sizeof(fdt), &files->fdt);
	if (!fdt)
		return;
	bpf_probe_read_kernel(&max_fds, sizeof(max_fds), &fdt->max_fds);
	if (fd >= max_fds)
		return;
	bpf_probe_read_kernel(&fds, sizeof(fds), &fdt->fd);
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file)
		return;
	bpf_probe_read_kernel(&sock, sizeof(sock), &file->private_data);
	if (!sock)
		return;
	bpf_probe_read_kernel(&back, sizeof(back), &sock->file);
	if (back != file)
		return;
	bpf_probe_read_kernel(&sk, sizeof(sk), &sock->sk);
	if (!sk)
		return;
	bpf_probe_read_kernel(&family, sizeof(family), &sk->__sk_common.skc_family);
	bpf_probe_read_kernel(&e->lport, sizeof(e->lport), &sk->__sk_common.skc_num);
	bpf_probe_read_kernel(&dport, sizeof(dport), &sk->__sk_common.skc_dport);
	e->dport = ntohs(dport);
	if (family == AF_INET) {
		bpf_probe_read_kernel(e->saddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_probe_read_kernel(e->daddr, 4, &sk->__sk_common.skc_daddr);
	} else if (family == AF_INET6) {
		bpf_probe_read_kernel(e->saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_probe_read_kernel(e->daddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
	e->family = family;
}

/* iscsi_tcp's bind: transport_eph is the fd of the sender's socket. */
int probe_conn_bind(struct pt_regs *ctx, struct iscsi_cls_session *cls_session,
		    struct iscsi_cls_conn *cls_conn, u64 transport_eph, int is_leading)
{
	struct event_t *e = new_event(KIND_BIND);
	struct conn_ids ids = {};
	u64 tid = bpf_get_current_pid_tgid();

	if (!e)
		return 0;
	read_conn_ids(cls_conn, &ids);
	if (cls_session)
		bpf_probe_read_kernel(&ids.sid, sizeof(ids.sid), &cls_session->sid);
	e->sid = ids.sid;
	e->cid = ids.cid;
	e->value64 = transport_eph;
	e->value = is_leading;
	read_socket(transport_eph, e);
	pending.update(&tid, &ids);
	events.perf_submit(ctx, e, sizeof(*e));
	return 0;
}

static __always_inline int submit_return(struct pt_regs *ctx, u32 kind)
{
	struct event_t *e = new_event(kind);
	u64 tid = bpf_get_current_pid_tgid();
	struct conn_ids *ids = pending.lookup(&tid);

	if (!e)
		return 0;
	if (ids) {
		e->sid = ids->sid;
		e->cid = ids->cid;
		pending.delete(&tid);
	}
	e->value = PT_REGS_RC(ctx);
	events.perf_submit(ctx, e, sizeof(*e));
	return 0;
}

int probe_conn_bind_ret(struct pt_regs *ctx)
{
	return submit_return(ctx, KIND_BIND_RET);
}

int probe_conn_start(struct pt_regs *ctx, struct iscsi_cls_conn *cls_conn)
{
	struct event_t *e = new_event(KIND_CONN_START);
	struct conn_ids ids = {};
	u64 tid = bpf_get_current_pid_tgid();

	if (!e)
		return 0;
	read_conn_ids(cls_conn, &ids);
	e->sid = ids.sid;
	e->cid = ids.cid;
	pending.update(&tid, &ids);
	events.perf_submit(ctx, e, sizeof(*e));
	return 0;
}

int probe_conn_start_ret(struct pt_regs *ctx)
{
	return submit_return(ctx, KIND_CONN_START_RET);
}

int probe_conn_stop(struct pt_regs *ctx, struct iscsi_cls_conn *cls_conn, int flag)
{
	struct event_t *e = new_event(KIND_CONN_STOP);
	struct conn_ids ids = {};

	if (!e)
		return 0;
	read_conn_ids(cls_conn, &ids);
	e->sid = ids.sid;
	e->cid = ids.cid;
	e->value = flag;
	events.perf_submit(ctx, e, sizeof(*e));
	return 0;
}

int probe_conn_failure(struct pt_regs *ctx, struct iscsi_conn *conn, int err)
{
	struct event_t *e = new_event(KIND_CONN_FAILURE);
	struct iscsi_cls_conn *cls_conn = 0;
	struct conn_ids ids = {};

	if (!e)
		return 0;
	if (conn)
		bpf_probe_read_kernel(&cls_conn, sizeof(cls_conn), &conn->cls_conn);
	read_conn_ids(cls_conn, &ids);
	e->sid = ids.sid;
	e->cid = ids.cid;
	e->value = err;
	events.perf_submit(ctx, e, sizeof(*e));
	return 0;
}

int probe_conn_error_event(struct pt_regs *ctx, struct iscsi_cls_conn *conn, int error)
{
	struct event_t *e = new_event(KIND_CONN_ERROR);
	struct conn_ids ids = {};

	if (!e)
		return 0;
	read_conn_ids(conn, &ids);
	e->sid = ids.sid;
	e->cid = ids.cid;
	e->value = error;
	events.perf_submit(ctx, e, sizeof(*e));
	return 0;
}

/*
 * The iscsi_log_msg tracepoint class: two __data_loc strings (the low 16 bits are the
 * offset from the start of the record, the high 16 bits the length).
 */
static __always_inline int submit_log_msg(void *args, u32 loc_dname, u32 loc_msg, int which)
{
	struct event_t *e = new_event(KIND_TRACEPOINT);

	if (!e)
		return 0;
	e->value = which;
	bpf_probe_read_kernel_str(e->dev, sizeof(e->dev), (char *)args + (loc_dname & 0xffff));
	e->text_len = bpf_probe_read_kernel_str(e->text, sizeof(e->text),
						(char *)args + (loc_msg & 0xffff));
	events.perf_submit(args, e, sizeof(*e));
	return 0;
}
