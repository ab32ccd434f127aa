import { XMLParser } from 'fast-xml-parser';
import { SnapshiftError } from '../../core/errors.ts';

/**
 * libvirt's XML documents as snapshift reads and writes them: domain disks, checkpoints, backup jobs
 * (libvirt.org: formatdomain.html "Hard drives", formatcheckpoint.html, formatbackup.html).
 */

/** One layer under a disk's active image (`<backingStore>`), top first. */
export interface LibvirtBackingLayer {
  type: string;
  path: string | undefined;
  format: string | undefined;
}

/** A disk as the domain XML describes it. */
export interface LibvirtDisk {
  /** `<target dev>`: the name every virsh disk command takes (`vda`). */
  target: string;
  bus: string | undefined;
  /** `disk`, `cdrom`, `floppy`, `lun`. */
  device: string;
  /** `file`, `block`, `network`, `volume`, `dir`, `nvme`, `vhostuser`. */
  type: string;
  /** The active image: a file or block device path, or `protocol:name` for network disks (`rbd:pool/img`). */
  path: string | undefined;
  /** `<driver type>`: qcow2, raw, … */
  format: string | undefined;
  /** `<driver name>`: qemu. */
  driver: string | undefined;
  /** QEMU's device alias (`virtio-disk0`): the qdev id under /machine/peripheral/. */
  alias: string | undefined;
  readOnly: boolean;
  backingChain: LibvirtBackingLayer[];
  /** A block job's `<mirror>`: an active commit (`active-commit`) or copy, and whether it may pivot now. */
  mirror: { job: string; ready: boolean; path: string | undefined } | undefined;
}

export interface LibvirtDomainXml {
  name: string;
  uuid: string;
  /** `qemu`, `kvm`, … */
  type: string;
  disks: LibvirtDisk[];
}

export interface LibvirtCheckpointDisk {
  name: string;
  /** `bitmap` or `no`. */
  checkpoint: string;
  bitmap: string | undefined;
  /** With `--size`: bytes changed since the checkpoint (what an incremental from it would read). */
  sizeBytes: number | undefined;
}

export interface LibvirtCheckpoint {
  name: string;
  parent: string | undefined;
  creationTime: Date | undefined;
  disks: LibvirtCheckpointDisk[];
}

export interface LibvirtBackupDisk {
  name: string;
  backup: boolean;
  /** `full` or `incremental`, as libvirt chose. */
  backupMode: string | undefined;
  incremental: string | undefined;
  /** Pull mode: the NBD export name and the dirty bitmap it carries (`backup-<disk>`). */
  exportName: string | undefined;
  exportBitmap: string | undefined;
  scratchPath: string | undefined;
}

export interface LibvirtBackupJob {
  mode: 'pull' | 'push';
  incremental: string | undefined;
  server: { transport: string; socketPath: string | undefined; host: string | undefined; port: number | undefined } | undefined;
  disks: LibvirtBackupDisk[];
}

type XmlNode = Record<string, unknown>;

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@',
  parseAttributeValue: false,
  parseTagValue: false,
  trimValues: true,
  isArray: (name) => name === 'disk',
});

function parse(xml: string, root: string, what: string): XmlNode {
  let document: unknown;
  try {
    document = parser.parse(xml);
  } catch (error) {
    throw unparsable(what, (error as Error).message, error);
  }
  const node = (document as XmlNode | undefined)?.[root];
  if (!isNode(node)) throw unparsable(what, `no <${root}> element`);
  return node;
}

function unparsable(what: string, why: string, cause?: unknown): SnapshiftError {
  return new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `cannot read the ${what} virsh printed: ${why}`, { cause });
}

function isNode(value: unknown): value is XmlNode {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function child(node: XmlNode | undefined, name: string): XmlNode | undefined {
  const value = node?.[name];
  return isNode(value) ? value : undefined;
}

function attr(node: XmlNode | undefined, name: string): string | undefined {
  const value = node?.[`@${name}`];
  return typeof value === 'string' ? value : undefined;
}

function text(node: XmlNode | undefined, name: string): string | undefined {
  const value = node?.[name];
  if (typeof value === 'string') return value;
  if (isNode(value) && typeof value['#text'] === 'string') return value['#text'];
  return undefined;
}

function disksOf(node: XmlNode | undefined): XmlNode[] {
  const value = node?.['disk'];
  return Array.isArray(value) ? value.filter(isNode) : [];
}

/** The image a `<source>` names: `file`, `dev`, `dir`, or `protocol:name` for a network disk. */
function sourcePath(source: XmlNode | undefined): string | undefined {
  if (!source) return undefined;
  const local = attr(source, 'file') ?? attr(source, 'dev') ?? attr(source, 'dir') ?? attr(source, 'volume');
  if (local !== undefined) return local;
  const name = attr(source, 'name');
  const protocol = attr(source, 'protocol');
  return name === undefined ? undefined : protocol ? `${protocol}:${name}` : name;
}

function backingChain(disk: XmlNode): LibvirtBackingLayer[] {
  const chain: LibvirtBackingLayer[] = [];
  let layer = child(disk, 'backingStore');
  while (layer && attr(layer, 'type') !== undefined) {
    chain.push({ type: attr(layer, 'type')!, path: sourcePath(child(layer, 'source')), format: attr(child(layer, 'format'), 'type') });
    layer = child(layer, 'backingStore');
  }
  return chain;
}

/** The domain's name, UUID and disks (`virsh dumpxml`, live or `--inactive`). */
export function parseDomainXml(xml: string): LibvirtDomainXml {
  const domain = parse(xml, 'domain', 'domain XML');
  const name = text(domain, 'name');
  const uuid = text(domain, 'uuid');
  if (!name || !uuid) throw unparsable('domain XML', 'no <name> or <uuid>');
  const disks = disksOf(child(domain, 'devices')).map((disk): LibvirtDisk => {
    const target = attr(child(disk, 'target'), 'dev');
    if (!target) throw unparsable('domain XML', `a disk of ${name} has no <target dev>`);
    const driver = child(disk, 'driver');
    const mirror = child(disk, 'mirror');
    return {
      target,
      bus: attr(child(disk, 'target'), 'bus'),
      device: attr(disk, 'device') ?? 'disk',
      type: attr(disk, 'type') ?? 'file',
      path: sourcePath(child(disk, 'source')),
      format: attr(driver, 'type'),
      driver: attr(driver, 'name'),
      alias: attr(child(disk, 'alias'), 'name'),
      readOnly: 'readonly' in disk,
      backingChain: backingChain(disk),
      mirror: mirror ? { job: attr(mirror, 'job') ?? 'copy', ready: attr(mirror, 'ready') === 'yes', path: sourcePath(child(mirror, 'source')) ?? attr(mirror, 'file') } : undefined,
    };
  });
  return { name, uuid, type: attr(domain, 'type') ?? 'unknown', disks };
}

/** A checkpoint (`virsh checkpoint-dumpxml`, best with `--no-domain`, and `--size` for the sizes). */
export function parseCheckpointXml(xml: string): LibvirtCheckpoint {
  const checkpoint = parse(xml, 'domaincheckpoint', 'checkpoint XML');
  const name = text(checkpoint, 'name');
  if (!name) throw unparsable('checkpoint XML', 'no <name>');
  const creation = text(checkpoint, 'creationTime');
  return {
    name,
    parent: text(child(checkpoint, 'parent'), 'name'),
    creationTime: creation && /^\d+$/.test(creation) ? new Date(Number(creation) * 1000) : undefined,
    disks: disksOf(child(checkpoint, 'disks')).map((disk) => {
      const size = attr(disk, 'size');
      return { name: attr(disk, 'name') ?? '', checkpoint: attr(disk, 'checkpoint') ?? 'bitmap', bitmap: attr(disk, 'bitmap'), sizeBytes: size === undefined ? undefined : Number(size) };
    }),
  };
}

/** A running backup job (`virsh backup-dumpxml`): where its NBD server listens, per disk what it exports. */
export function parseBackupXml(xml: string): LibvirtBackupJob {
  const backup = parse(xml, 'domainbackup', 'backup XML');
  const mode = attr(backup, 'mode') === 'pull' ? 'pull' : 'push';
  const server = child(backup, 'server');
  const port = attr(server, 'port');
  return {
    mode,
    incremental: text(backup, 'incremental'),
    server: server ? { transport: attr(server, 'transport') ?? 'tcp', socketPath: attr(server, 'socket'), host: attr(server, 'name'), port: port === undefined ? undefined : Number(port) } : undefined,
    disks: disksOf(child(backup, 'disks')).map((disk) => ({
      name: attr(disk, 'name') ?? '',
      backup: attr(disk, 'backup') !== 'no',
      backupMode: attr(disk, 'backupmode'),
      incremental: attr(disk, 'incremental'),
      exportName: attr(disk, 'exportname'),
      exportBitmap: attr(disk, 'exportbitmap'),
      scratchPath: attr(child(disk, 'scratch'), 'file') ?? attr(child(disk, 'scratch'), 'dev'),
    })),
  };
}

/** XML text and attribute escaping. */
export function xmlEscape(value: string): string {
  return value.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;').replaceAll("'", '&apos;').replaceAll('"', '&quot;');
}

/** A new checkpoint: a persistent dirty bitmap per listed disk (`checkpoint='bitmap'`), `no` for the others. */
export function checkpointXml(spec: { name: string; description?: string; disks: ReadonlyArray<{ name: string; bitmap?: boolean }> }): string {
  const disks = spec.disks.map((disk) => `    <disk name='${xmlEscape(disk.name)}' checkpoint='${disk.bitmap === false ? 'no' : 'bitmap'}'/>`);
  const description = spec.description ? `  <description>${xmlEscape(spec.description)}</description>\n` : '';
  return `<domaincheckpoint>\n  <name>${xmlEscape(spec.name)}</name>\n${description}  <disks>\n${disks.join('\n')}\n  </disks>\n</domaincheckpoint>\n`;
}

export interface PullBackupSpec {
  /** Checkpoint to be incremental from; absent for a full. */
  incremental?: string;
  /** The NBD server's unix socket (libvirt creates it; it must not exist). */
  socketPath: string;
  /**
   * Disks to export, each with its scratch file (copy-before-write target); `incremental` makes that disk's
   * export carry the changes since that checkpoint (per disk, formatbackup.html "backupmode") while the
   * others are full.
   */
  disks: ReadonlyArray<{ name: string; scratchPath: string; incremental?: string }>;
  /** Disks not to export: libvirt exports every disk not named `backup='no'`. */
  excludedDisks?: readonly string[];
}

/** A pull-mode backup over NBD on a unix socket (formatbackup.html). */
export function pullBackupXml(spec: PullBackupSpec): string {
  const incremental = spec.incremental ? `  <incremental>${xmlEscape(spec.incremental)}</incremental>\n` : '';
  const disks = [
    ...spec.disks.map((disk) => {
      const mode = disk.incremental === undefined ? '' : ` backupmode='incremental' incremental='${xmlEscape(disk.incremental)}'`;
      return `    <disk name='${xmlEscape(disk.name)}' backup='yes'${mode} type='file'><scratch file='${xmlEscape(disk.scratchPath)}'/></disk>`;
    }),
    ...(spec.excludedDisks ?? []).map((name) => `    <disk name='${xmlEscape(name)}' backup='no'/>`),
  ];
  return `<domainbackup mode='pull'>\n${incremental}  <server transport='unix' socket='${xmlEscape(spec.socketPath)}'/>\n  <disks>\n${disks.join('\n')}\n  </disks>\n</domainbackup>\n`;
}
