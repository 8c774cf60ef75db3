/* The floor: the cheapest libfuse low-level filesystem, in C, to know what one FUSE round
 * trip costs on this machine without Python (see bench/README.md, "Requests per create").
 *
 * One flat root directory of regular files; writes are discarded but extend the size, reads
 * return zeros.  Like bench/ceiling.py: default_permissions, getxattr answers ENODATA (so
 * the kernel asks for security.capability before every write(2)), a missing name is a
 * negative entry cached for 60 s, entries and attributes are cached for 300 s, page-cache
 * mode (keep_cache), FLUSH answered ENOSYS.  Single-threaded (fuse_session_loop).
 *
 * Build: cc -O2 -Wall -o floor bench/floor.c $(pkg-config --cflags --libs fuse3)
 * Run:   ./floor MOUNTPOINT   (foreground; SIGTERM or SIGINT, or fusermount3 -u MOUNTPOINT,
 *        unmounts and exits 0)
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_FILES (1 << 20)
#define TIMEOUT 300.0
#define NEGATIVE_TIMEOUT 60.0

struct node {
	char *name; /* NULL: unlinked (or never used) */
	struct stat st;
};

static struct node nodes[MAX_FILES]; /* inode i is nodes[i]; 1 is the root */
static fuse_ino_t next_ino = 2;
static struct stat root;

#define BUCKETS (1 << 21)
/* Names to inodes: open addressing; 0 is empty, (fuse_ino_t)-1 a removed entry. */
static fuse_ino_t table[BUCKETS];

static unsigned long hash(const char *s)
{
	unsigned long h = 5381;
	while (*s)
		h = h * 33 + (unsigned char)*s++;
	return h;
}

/* The inode of *name* (0: none).  insert 1: enter *ino* under *name*; -1: remove it. */
static fuse_ino_t lookup_index(const char *name, int insert, fuse_ino_t ino)
{
	unsigned long i = hash(name) & (BUCKETS - 1);
	for (;; i = (i + 1) & (BUCKETS - 1)) {
		fuse_ino_t t = table[i];
		if (t == 0) {
			if (insert)
				table[i] = ino;
			return insert ? ino : 0;
		}
		if (t != (fuse_ino_t)-1 && nodes[t].name && strcmp(nodes[t].name, name) == 0) {
			if (insert == -1)
				table[i] = (fuse_ino_t)-1;
			return t;
		}
	}
}

static struct node *find(const char *name)
{
	fuse_ino_t ino = lookup_index(name, 0, 0);
	return ino ? &nodes[ino] : NULL;
}

static void fill_entry(struct fuse_entry_param *e, fuse_ino_t ino, const struct stat *st)
{
	memset(e, 0, sizeof(*e));
	e->ino = ino;
	e->attr = *st;
	e->attr_timeout = TIMEOUT;
	e->entry_timeout = TIMEOUT;
}

static struct stat *stat_of(fuse_ino_t ino)
{
	if (ino == FUSE_ROOT_ID)
		return &root;
	if (ino < next_ino && ino < MAX_FILES)
		return &nodes[ino].st;
	return NULL;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	struct node *n = parent == FUSE_ROOT_ID ? find(name) : NULL;
	if (n) {
		fill_entry(&e, n->st.st_ino, &n->st);
	} else {
		memset(&e, 0, sizeof(e));
		e.entry_timeout = NEGATIVE_TIMEOUT;
	}
	fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat *st = stat_of(ino);
	if (!st)
		fuse_reply_err(req, ENOENT);
	else
		fuse_reply_attr(req, st, TIMEOUT);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	struct stat *st = stat_of(ino);
	if (!st) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (to_set & FUSE_SET_ATTR_SIZE)
		st->st_size = attr->st_size;
	if (to_set & FUSE_SET_ATTR_MODE)
		st->st_mode = (st->st_mode & S_IFMT) | (attr->st_mode & 07777);
	fuse_reply_attr(req, st, TIMEOUT);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		      struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	if (parent != FUSE_ROOT_ID || next_ino >= MAX_FILES) {
		fuse_reply_err(req, parent != FUSE_ROOT_ID ? ENOENT : ENOSPC);
		return;
	}
	if (find(name)) {
		fuse_reply_err(req, EEXIST);
		return;
	}
	fuse_ino_t ino = next_ino++;
	struct node *n = &nodes[ino];
	n->name = strdup(name);
	memset(&n->st, 0, sizeof(n->st));
	n->st.st_ino = ino;
	n->st.st_mode = S_IFREG | (mode & 07777);
	n->st.st_nlink = 1;
	n->st.st_uid = ctx->uid;
	n->st.st_gid = ctx->gid;
	n->st.st_blksize = 4096;
	lookup_index(name, 1, ino);
	fi->fh = ino;
	fi->keep_cache = 1;
	fill_entry(&e, ino, &n->st);
	fuse_reply_create(req, &e, fi);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fi->fh = ino;
	fi->keep_cache = 1;
	fuse_reply_open(req, fi);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct stat *st = stat_of(ino);
	if (st && off + (off_t)size > st->st_size) {
		st->st_size = off + size;
		st->st_blocks = (st->st_size + 511) / 512;
	}
	fuse_reply_write(req, size);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	static char zeros[1 << 20];
	struct stat *st = stat_of(ino);
	off_t end = st ? st->st_size : 0;
	size_t n = off >= end ? 0 : (size_t)(end - off) < size ? (size_t)(end - off) : size;
	fuse_reply_buf(req, zeros, n > sizeof(zeros) ? sizeof(zeros) : n);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct node *n = parent == FUSE_ROOT_ID ? find(name) : NULL;
	if (!n) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	lookup_index(name, -1, 0);
	free(n->name);
	n->name = NULL;
	n->st.st_nlink = 0;
	fuse_reply_err(req, 0);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	fuse_reply_err(req, ENODATA);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	fuse_reply_none(req);
}

static const struct fuse_lowlevel_ops ops = {
	.lookup = op_lookup,
	.forget = op_forget,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.create = op_create,
	.open = op_open,
	.read = op_read,
	.write = op_write,
	.release = op_release,
	.unlink = op_unlink,
	.getxattr = op_getxattr,
};

int main(int argc, char *argv[])
{
	char *fake[] = {argv[0], "-o", "default_permissions,fsname=floor,subtype=floor"};
	struct fuse_args args = FUSE_ARGS_INIT(3, fake);
	struct fuse_session *se;
	int ret = 1;

	if (argc != 2) {
		fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
		return 2;
	}
	root.st_ino = FUSE_ROOT_ID;
	root.st_mode = S_IFDIR | 0755;
	root.st_nlink = 2;
	root.st_uid = getuid();
	root.st_gid = getgid();
	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (!se)
		return 1;
	if (fuse_set_signal_handlers(se) == 0) {
		if (fuse_session_mount(se, argv[1]) == 0) {
			ret = fuse_session_loop(se);
			fuse_session_unmount(se);
		}
		fuse_remove_signal_handlers(se);
	}
	fuse_session_destroy(se);
	return ret < 0 ? 1 : 0; /* > 0: the signal that ended the loop (SIGTERM, SIGINT) */
}
