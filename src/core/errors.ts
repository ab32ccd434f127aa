/** Exit statuses a user can rely on (DESIGN.md § Conventions, README § Exit statuses). */
export const ExitStatus = {
  success: 0,
  warning: 1,
  failed: 2,
  /** Stopped by Ctrl-C / SIGTERM after undoing its work. */
  stopped: 3,
  usage: 64,
} as const;
export type ExitStatus = (typeof ExitStatus)[keyof typeof ExitStatus];

interface ErrorCodeInfo {
  exitStatus: ExitStatus;
  /** One line for docs/ERRORS.md: what went wrong, in a user's words. */
  meaning: string;
}

const failed = ExitStatus.failed;

/**
 * Every error code snapshift raises, with the exit status the CLI gives it and what it means. A code not
 * listed here does not type-check: add it here (and regenerate docs/ERRORS.md with
 * `node --import tsx scripts/error-codes.ts > docs/ERRORS.md`).
 */
export const errorCodes = {
  // Usage: the request was malformed, nothing was attempted.
  USAGE: { exitStatus: ExitStatus.usage, meaning: 'a command-line argument, option or job definition is malformed' },
  BAD_ARGUMENT: { exitStatus: ExitStatus.usage, meaning: 'a value given to a command or API call is out of range (password file, chunk range, number)' },

  // State and catalog
  CATALOG_OPEN_FAILED: { exitStatus: failed, meaning: 'the catalog (catalog.sqlite under the home folder) cannot be opened' },
  DAEMON_RUNNING: { exitStatus: failed, meaning: 'another snapshift daemon already runs for this catalog' },
  HOST_UNKNOWN: { exitStatus: failed, meaning: 'no host of that name is registered' },
  VM_UNKNOWN: { exitStatus: failed, meaning: 'no VM of that name is registered (snapshift host add, host discover)' },
  VM_NAME_TAKEN: { exitStatus: failed, meaning: 'a VM of that name is already registered on another host: VM names are unique across hosts' },
  HOST_KIND_UNKNOWN: { exitStatus: ExitStatus.usage, meaning: 'no hypervisor adapter of that kind (qemu, libvirt)' },
  JOB_UNKNOWN: { exitStatus: failed, meaning: 'no job of that name exists' },
  SESSION_UNKNOWN: { exitStatus: failed, meaning: 'no session with that id (or id prefix) exists' },

  // Programs we run
  PROGRAM_MISSING: { exitStatus: failed, meaning: 'a program snapshift needs is not installed (bash scripts/setup.sh)' },
  COMMAND_FAILED: { exitStatus: failed, meaning: 'a program snapshift ran exited with an error; its last stderr line is in the message' },

  // Hypervisor: QEMU monitor, guest agent, VM snapshots
  QMP_CONNECT_FAILED: { exitStatus: failed, meaning: 'the VM\'s QMP socket cannot be reached' },
  QMP_NOT_QEMU: { exitStatus: failed, meaning: 'the socket does not speak QMP, or another client holds it' },
  QMP_DISCONNECTED: { exitStatus: failed, meaning: 'the QMP connection closed during a command' },
  QMP_TIMEOUT: { exitStatus: failed, meaning: 'QEMU did not answer a QMP command in time' },
  QMP_PROTOCOL_ERROR: { exitStatus: failed, meaning: 'QEMU sent something that is not QMP' },
  QMP_COMMAND_FAILED: { exitStatus: failed, meaning: 'QEMU refused a QMP command; its error class and description are in the message' },
  QGA_CONNECT_FAILED: { exitStatus: failed, meaning: 'the guest agent socket cannot be reached' },
  QGA_NOT_AGENT: { exitStatus: failed, meaning: 'the socket did not answer the guest agent\'s sync' },
  QGA_DISCONNECTED: { exitStatus: failed, meaning: 'the guest agent channel closed' },
  QGA_TIMEOUT: { exitStatus: failed, meaning: 'the guest agent did not answer in time (is qemu-ga running in the guest?)' },
  QGA_COMMAND_FAILED: { exitStatus: failed, meaning: 'the guest agent refused a command (e.g. freezing file systems)' },
  QUIESCE_THAW_FAILED: { exitStatus: failed, meaning: 'the guest\'s file systems could not be thawed after the VM snapshot or fleecing started: it was undone; check the guest is not left frozen' },
  VM_HAS_NO_DISKS: { exitStatus: failed, meaning: 'the VM has no disk to back up' },
  DISK_FORMAT_UNSUPPORTED: { exitStatus: failed, meaning: 'a disk\'s format cannot be snapshotted (only qcow2 and raw)' },
  DISK_SIZE_MISMATCH: { exitStatus: failed, meaning: 'the exported disk\'s size differs from what QEMU reports' },
  VM_SNAPSHOT_FAILED: { exitStatus: failed, meaning: 'the VM snapshot could not be taken' },
  VM_SNAPSHOT_COMMIT_FAILED: { exitStatus: failed, meaning: 'the VM snapshot could not be committed back (the hunter retries it)' },
  FLEECING_FAILED: { exitStatus: failed, meaning: 'fleecing (a point-in-time view of running disks through copy-before-write) could not be started' },
  FLEECING_BROKEN: { exitStatus: failed, meaning: 'fleecing gave up its point in time so the guest could keep writing (scratch space ran low, or its job ended)' },
  FLEECING_RELEASE_FAILED: { exitStatus: failed, meaning: 'fleecing could not be fully removed from QEMU (snapshift hunt retries)' },

  // Hypervisor: libvirt (through virsh)
  LIBVIRT_CONNECT_FAILED: { exitStatus: failed, meaning: 'virsh cannot reach the libvirt daemon at the host\'s URI (is libvirtd running, is the socket path right?)' },
  LIBVIRT_DOMAIN_UNKNOWN: { exitStatus: failed, meaning: 'libvirt knows no domain of that name or UUID' },
  LIBVIRT_COMMAND_FAILED: { exitStatus: failed, meaning: 'libvirt refused a virsh command; its error line is in the message' },
  LIBVIRT_BLOCK_JOB_ACTIVE: { exitStatus: failed, meaning: 'a disk already has a block job (a commit a stopped run left behind: snapshift hunt finishes it)' },
  LIBVIRT_NO_JOB: { exitStatus: failed, meaning: 'the domain has no job (backup) of the kind asked for' },
  LIBVIRT_CHECKPOINT_UNKNOWN: { exitStatus: failed, meaning: 'the domain has no checkpoint of that name' },
  LIBVIRT_CHECKPOINT_INCONSISTENT: { exitStatus: failed, meaning: 'a checkpoint\'s dirty bitmap is missing or broken (QEMU was killed): delete the checkpoints and take a full backup' },
  LIBVIRT_BACKUP_SCRATCH_EXISTS: { exitStatus: failed, meaning: 'a backup\'s scratch file already exists (a previous backup job is still ending, or left it)' },
  LIBVIRT_AGENT_UNAVAILABLE: { exitStatus: failed, meaning: 'the domain\'s QEMU guest agent is not configured or not connected' },
  LIBVIRT_OUTPUT_UNPARSABLE: { exitStatus: failed, meaning: 'virsh printed something snapshift cannot read (a libvirt version it does not know?)' },
  LEDGER_ENTRY_BAD: { exitStatus: failed, meaning: 'a VM-snapshot ledger row lacks what its hypervisor adapter needs to undo it (written by another version?)' },
  VM_UUID_MISMATCH: { exitStatus: failed, meaning: 'the VM on its host has another UUID than the one registered (a different VM took its name): check it, then register it again' },

  // Data mover: NBD
  NBD_SERVER_BUSY: { exitStatus: failed, meaning: 'QEMU already runs an NBD server whose socket snapshift does not know (host add --nbd-socket)' },
  NBD_CONNECT_FAILED: { exitStatus: failed, meaning: 'the NBD socket cannot be reached' },
  NBD_HANDSHAKE_FAILED: { exitStatus: failed, meaning: 'the NBD server did not complete the handshake' },
  NBD_EXPORT_NOT_FOUND: { exitStatus: failed, meaning: 'the NBD server has no export of that name' },
  NBD_META_CONTEXT_UNAVAILABLE: { exitStatus: failed, meaning: 'the NBD export does not offer the block status (or dirty bitmap) asked for' },
  NBD_DISCONNECTED: { exitStatus: failed, meaning: 'the NBD connection broke' },
  NBD_PROTOCOL_ERROR: { exitStatus: failed, meaning: 'the NBD server sent a reply that breaks the protocol' },
  NBD_COMMAND_FAILED: { exitStatus: failed, meaning: 'the NBD server answered a read or block-status request with an error (e.g. EIO)' },
  NBD_SERVER_LISTEN_FAILED: { exitStatus: failed, meaning: 'our NBD server cannot listen on the unix socket or TCP address asked for (in use, or a file is in the way)' },
  NBD_READ_ONLY: { exitStatus: failed, meaning: 'a write was sent to a read-only NBD export' },
  IMAGE_EXPORT_FAILED: { exitStatus: failed, meaning: 'an image cannot be served over NBD for reading' },
  STORAGE_DAEMON_FAILED: { exitStatus: failed, meaning: 'qemu-storage-daemon exited at start' },

  // Storage systems
  STORAGE_UNSUPPORTED: { exitStatus: failed, meaning: 'a disk is on storage no provider can snapshot (a reason to fail over to regular mode)' },
  STORAGE_LOCATE_FAILED: { exitStatus: failed, meaning: 'the storage volume holding a disk cannot be found' },
  STORAGE_SNAPSHOT_FAILED: { exitStatus: failed, meaning: 'the storage snapshot could not be taken' },
  STORAGE_SNAPSHOT_LIST_FAILED: { exitStatus: failed, meaning: 'the storage system\'s snapshots cannot be listed' },
  STORAGE_SNAPSHOT_RETAIN_FAILED: { exitStatus: failed, meaning: 'a storage snapshot could not be kept as the base of the next incremental' },
  STORAGE_SNAPSHOT_REMOVE_FAILED: { exitStatus: failed, meaning: 'a storage snapshot could not be removed (snapshift hunt retries)' },
  STORAGE_NOT_OURS: { exitStatus: failed, meaning: 'refused to remove a snapshot snapshift did not make' },
  STORAGE_IMAGE_NOT_IN_SNAPSHOT: { exitStatus: failed, meaning: 'a disk image is in none of the session\'s storage snapshots' },
  STORAGE_GROUP_UNDO_FAILED: { exitStatus: failed, meaning: 'undoing a storage-snapshot group failed (its committed restore points are kept)' },
  RBD_DIFF_FAILED: { exitStatus: failed, meaning: 'rbd diff could not list a disk\'s changes' },
  ZFS_COMMAND_FAILED: { exitStatus: failed, meaning: 'a zfs or zpool command failed' },
  ZFS_NOT_RUNNING: { exitStatus: failed, meaning: 'the ZFS daemon (zfs-fuse) is not running' },
  ZFS_NOT_ANSWERING: { exitStatus: failed, meaning: 'the ZFS daemon did not answer in time' },

  // Repository
  REPO_NOT_FOUND: { exitStatus: failed, meaning: 'no repository at that path' },
  REPO_EXISTS: { exitStatus: failed, meaning: 'repo init was given a folder that is not empty' },
  REPO_NOT_A_REPOSITORY: { exitStatus: failed, meaning: 'the folder\'s config is not a snapshift repository\'s' },
  REPO_CONFIG_DAMAGED: { exitStatus: failed, meaning: 'the repository config cannot be read' },
  REPO_VERSION_UNSUPPORTED: { exitStatus: failed, meaning: 'the repository has a format version this snapshift cannot read' },
  REPO_PASSWORD_REQUIRED: { exitStatus: failed, meaning: 'the repository is encrypted and no password was given (--password-file, SNAPSHIFT_PASSWORD, a credential)' },
  REPO_BAD_PASSWORD: { exitStatus: failed, meaning: 'no key slot opens with the password given' },
  REPO_KEY_DAMAGED: { exitStatus: failed, meaning: 'a key slot is damaged, or none is left' },
  REPO_KEY_NOT_FOUND: { exitStatus: failed, meaning: 'no key slot (or more than one) matches the id given' },
  REPO_LAST_KEY: { exitStatus: failed, meaning: 'refused to remove the repository\'s last key slot' },
  REPO_NOT_ENCRYPTED: { exitStatus: failed, meaning: 'key commands on a repository without encryption' },
  REPO_LOCKED: { exitStatus: failed, meaning: 'another process holds a conflicting repository lock' },
  REPO_READ_ONLY: { exitStatus: failed, meaning: 'the repository is on a read-only file system' },
  REPO_DISK_FULL: { exitStatus: failed, meaning: 'the repository\'s file system is full; nothing was committed' },
  REPO_SHORT_READ: { exitStatus: failed, meaning: 'a repository file ends early (truncated)' },
  REPO_FILE_DAMAGED: { exitStatus: failed, meaning: 'a manifest, index or pack file is damaged' },
  REPO_CHUNK_DAMAGED: { exitStatus: failed, meaning: 'a chunk a restore point needs is missing or damaged (snapshift check)' },
  REPO_RESTORE_POINT_NOT_FOUND: { exitStatus: failed, meaning: 'no restore point with that id in the repository' },
  REPO_RESTORE_POINT_AMBIGUOUS: { exitStatus: failed, meaning: 'the restore point id prefix matches several restore points' },
  REPO_CHECK_FAILED: { exitStatus: failed, meaning: 'snapshift check found errors' },
  REPO_GC_REFUSED: { exitStatus: failed, meaning: 'gc refused to run because some manifests cannot be read' },
  REPO_WORKER_FAILED: { exitStatus: failed, meaning: 'a blob worker (hashing, compression, encryption) failed' },
  REPO_WRITER_CLOSED: { exitStatus: failed, meaning: 'a backup writer was used after it committed or aborted (a bug)' },
  REPO_CLOSED: { exitStatus: failed, meaning: 'the repository was closed while work was in flight' },

  // Restore
  RESTORE_POINT_UNKNOWN: { exitStatus: failed, meaning: 'the catalog knows no restore point for that VM (snapshift catalog sync, or --point ID)' },
  RESTORE_NO_SUCH_DISK: { exitStatus: failed, meaning: 'the restore point has no disk of that name' },
  RESTORE_TARGET_EXISTS: { exitStatus: failed, meaning: 'the restore target exists (--force overwrites it)' },
  RESTORE_TARGET_FOLDER_MISSING: { exitStatus: failed, meaning: 'the folder the restore target would go into does not exist' },
  RESTORE_FAILED: { exitStatus: failed, meaning: 'serving a restore point to qemu-img failed (e.g. a damaged chunk); the first problem is in the message' },
  RESTORE_STOPPED: { exitStatus: ExitStatus.stopped, meaning: 'a restore was stopped by Ctrl-C or SIGTERM; the partial file was removed' },
  RESTORE_NO_CONFIGURATION: { exitStatus: failed, meaning: 'the restore point holds no VM configuration to re-create the VM from (written before VM restore existed)' },
  VM_START_FAILED: { exitStatus: failed, meaning: 'QEMU or libvirt did not start the restored or recovered VM; its own error is in the message' },
  BOOT_VERIFICATION_FAILED: { exitStatus: failed, meaning: 'the restore point did not boot: no console marker or guest-agent answer in time (its console tail is in the output)' },
  INSTANT_RECOVERY_UNKNOWN: { exitStatus: failed, meaning: 'no instant recovery of that name runs (snapshift instant-recovery list)' },
  INSTANT_RECOVERY_EXISTS: { exitStatus: failed, meaning: 'an instant recovery of that name already runs: stop it, or choose another --name' },
  INSTANT_RECOVERY_SERVER_FAILED: { exitStatus: failed, meaning: 'the NBD server behind an instant recovery did not start or is gone; the message says why' },
  INSTANT_RECOVERY_MIGRATE_FAILED: { exitStatus: failed, meaning: 'moving an instantly recovered VM to its datastore failed; the VM still runs from the backup' },

  // Demo and lab (test machinery)
  DEMO_BACKUP_FAILED: { exitStatus: failed, meaning: 'a demo backup failed' },
  DEMO_VERIFY_FAILED: { exitStatus: failed, meaning: 'a demo restore did not equal the disk at its snapshot instant' },
  LAB_HOST_UNFIT: { exitStatus: failed, meaning: 'this machine lacks what the lab needs (snapshift doctor)' },
  LAB_NOT_UP: { exitStatus: failed, meaning: 'no lab is up in that folder' },
  LAB_BROKEN: { exitStatus: failed, meaning: 'the lab is half up; take it down first' },
  LAB_LOCKED: { exitStatus: failed, meaning: 'the lab state is locked by another process' },
  LAB_STATE_BAD: { exitStatus: failed, meaning: 'the lab state file is unreadable' },
  LAB_UP_FAILED: { exitStatus: failed, meaning: 'bringing the lab up failed' },
  LAB_LOOP_FAILED: { exitStatus: failed, meaning: 'a loop device for a lab datastore could not be set up or detached' },
  LAB_MOUNT_FAILED: { exitStatus: failed, meaning: 'a lab datastore could not be mounted' },
  LAB_UNMOUNT_FAILED: { exitStatus: failed, meaning: 'a lab datastore could not be unmounted' },
  LAB_DATASTORE_UNKNOWN: { exitStatus: failed, meaning: 'the lab has no datastore of that kind' },
  LAB_KERNEL_DOWNLOAD: { exitStatus: failed, meaning: 'the lab guest kernel could not be downloaded' },
  LAB_VM_UNKNOWN: { exitStatus: failed, meaning: 'no lab VM of that name' },
  LAB_VM_EXISTS: { exitStatus: failed, meaning: 'a lab VM of that name already exists' },
  LAB_VM_RUNNING: { exitStatus: failed, meaning: 'the lab VM is already running' },
  LAB_VM_NOT_RUNNING: { exitStatus: failed, meaning: 'the lab VM is not running' },
  LAB_VM_FAILED: { exitStatus: failed, meaning: 'a lab guest stopped unexpectedly' },
  LAB_ZFS_FAILED: { exitStatus: failed, meaning: 'the lab\'s ZFS pool or daemon failed' },
  LAB_LIBVIRT_FAILED: { exitStatus: failed, meaning: 'the lab\'s own libvirtd or virtlogd did not start or stop cleanly' },
  LAB_CEPH_NOT_UP: { exitStatus: failed, meaning: 'no lab Ceph is up' },
  LAB_CEPH_FAILED: { exitStatus: failed, meaning: 'a lab Ceph daemon exited' },
  CEPH_COMMAND_FAILED: { exitStatus: failed, meaning: 'a ceph or rbd command of the lab failed' },

  // File-level restore (snapshift files)
  FILES_NO_SUCH_VOLUME: { exitStatus: failed, meaning: 'a path names no disk or partition of the restore point (snapshift files ls VM lists them)' },
  FILES_PATH_NOT_FOUND: { exitStatus: failed, meaning: 'no such file or directory in the restore point\'s filesystem (or a component of the path is not a directory)' },
  FILES_FILESYSTEM_UNSUPPORTED: { exitStatus: failed, meaning: 'the partition or disk holds no ext2/3/4, XFS or btrfs filesystem (swap, LVM, FAT, NTFS, encrypted or empty)' },
  FILES_PARTITION_TABLE_BAD: { exitStatus: failed, meaning: 'a disk\'s partition table is damaged (GPT headers fail their checksum, or an entry lies outside the disk)' },
  FILES_MOUNT_FAILED: { exitStatus: failed, meaning: 'a filesystem of the restore point could not be mounted read-only (disk reader, loop device or mount failed; needs root); the reason is in the message' },
  FILES_COPY_FAILED: { exitStatus: failed, meaning: 'copying files out of the mounted restore point failed (cp\'s own error is in the message)' },
  FILES_CLEANUP_FAILED: { exitStatus: failed, meaning: 'a mount, loop device or disk reader of a file-level restore could not be removed; the next snapshift files or hunt retries' },
  FILES_STOPPED: { exitStatus: ExitStatus.stopped, meaning: 'a file-level restore was stopped by Ctrl-C or SIGTERM; mounts, loop devices and disk readers were removed, files already copied stay' },
} as const satisfies Record<string, ErrorCodeInfo>;

export type ErrorCode = keyof typeof errorCodes;

/**
 * The one error class of snapshift: a stable `code` that programs match on and a message that tells a
 * person what happened and what to do. The CLI maps codes to exit statuses and prints the message alone.
 */
export class SnapshiftError extends Error {
  override readonly name = 'SnapshiftError';
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The exit status for a thrown value: the code's from `errorCodes`, else failed. */
export function exitStatusFor(error: unknown): ExitStatus {
  if (error instanceof SnapshiftError) return (errorCodes as Record<string, ErrorCodeInfo>)[error.code]?.exitStatus ?? ExitStatus.failed;
  return ExitStatus.failed;
}

/**
 * The message of any thrown value, for one-line error output. A SuppressedError (`await using` whose body
 * and disposal both threw) says "An error was suppressed during disposal": tell both, the first cause first.
 */
export function messageOf(error: unknown): string {
  if (isSuppressedError(error)) return `${messageOf(error.suppressed)}; then, while undoing: ${messageOf(error.error)}`;
  return error instanceof Error ? error.message : String(error);
}

function isSuppressedError(error: unknown): error is Error & { error: unknown; suppressed: unknown } {
  return error instanceof Error && error.name === 'SuppressedError' && 'suppressed' in error && 'error' in error;
}
