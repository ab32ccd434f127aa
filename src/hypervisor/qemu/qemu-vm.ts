import { SnapshiftError } from '../../core/errors.ts';
import type { VmDisk } from '../hypervisor.ts';
import { fileChildOf, queryNamedBlockNodes, rootNodeNames, protocolChildOf, type BlockNodeInfo } from './block-graph.ts';
import type { QmpSession } from './qmp-session.ts';

interface QueryBlockEntry {
  device: string;
  qdev?: string;
  inserted?: { 'node-name': string };
}

/** Filter drivers: between a format node and its protocol node, passing I/O through. */
const filterDrivers = new Set(['throttle', 'blkdebug', 'copy-on-read', 'preallocate', 'compress']);

/** Format drivers whose nodes we treat as a disk's top; protocol drivers sit below them. */
const protocolDrivers = new Set(['file', 'host_device', 'rbd', 'iscsi', 'nbd', 'nfs', 'ssh', 'http', 'https', 'null-co']);

/**
 * Lists the disks of the QEMU process behind `qmp`: for a VM from its guest devices (`query-block`, named by
 * qdev id), for qemu-storage-daemon from the nodes its exports hold. Our own read-only exports and overlays
 * are not disks. A copy-before-write filter on top of a disk (fleecing, ours or a backup job's) is looked
 * through: the disk is the node below it.
 */
export async function listQemuDisks(qmp: QmpSession): Promise<VmDisk[]> {
  const nodes = await queryNamedBlockNodes(qmp);
  const byName = new Map(nodes.map((node) => [node['node-name'], node]));
  const belowFilters = async (nodeName: string): Promise<string> => {
    let name = nodeName;
    for (let depth = 0; depth < 4 && byName.get(name)?.drv === 'copy-before-write'; depth++) name = (await fileChildOf(qmp, name)) ?? name;
    return name;
  };
  const devices = (await qmp.execute<QueryBlockEntry[]>('query-block')).filter((device) => device.inserted);
  const roots: Array<{ name: string; nodeName: string }> = [];
  if (devices.length > 0) {
    for (const device of devices) roots.push({ name: deviceName(device), nodeName: await belowFilters(device.inserted!['node-name']) });
  } else {
    for (const root of await rootNodeNames(qmp)) {
      const nodeName = await belowFilters(root);
      if (!nodeName.startsWith('snapshift-') && !roots.some((known) => known.nodeName === nodeName)) roots.push({ name: nodeName, nodeName });
    }
  }

  const filterNodes = new Set(nodes.filter((node) => filterDrivers.has(node.drv)).map((node) => node['node-name']));
  const disks: VmDisk[] = [];
  for (const root of roots) {
    const node = byName.get(root.nodeName);
    if (!node) continue;
    const protocolNode = byName.get((await protocolChildOf(qmp, root.nodeName, filterNodes)) ?? '');
    disks.push(diskFromNode(root.name, node, protocolNode));
  }
  if (disks.length === 0) throw new SnapshiftError('VM_HAS_NO_DISKS', 'the VM has no block devices with media to back up');
  return disks;
}

function deviceName(device: QueryBlockEntry): string {
  // qdev is '/machine/peripheral/vda/virtio-backend' for -device …,id=vda: the id is what a user named.
  const match = device.qdev?.match(/^\/machine\/peripheral\/([^/]+)/);
  return match?.[1] ?? (device.device || device.inserted!['node-name']);
}

function diskFromNode(name: string, node: BlockNodeInfo, protocolNode: BlockNodeInfo | undefined): VmDisk {
  const isFormat = !protocolDrivers.has(node.drv);
  return {
    name,
    nodeName: node['node-name'],
    imagePath: imagePathOf(protocolNode ?? node),
    format: isFormat ? node.drv : 'raw',
    protocol: protocolNode?.drv ?? node.drv,
    virtualSizeBytes: node.image['virtual-size'],
    actualSizeBytes: node.image['actual-size'],
  };
}

/**
 * QEMU 7.2 names an rbd node `json:{"pool": …, "image": …, "conf": …, "driver": "rbd", "namespace": ""}`
 * (for `-drive file=rbd:…` and `--blockdev driver=rbd` alike); we name the disk `rbd:pool[/namespace]/image`,
 * the image's identity whatever options QEMU opened it with.
 */
function imagePathOf(node: BlockNodeInfo): string {
  if (node.drv !== 'rbd' || !node.file.startsWith('json:')) return node.file;
  try {
    const options = JSON.parse(node.file.slice('json:'.length)) as { pool?: unknown; namespace?: unknown; image?: unknown };
    if (typeof options.pool !== 'string' || typeof options.image !== 'string') return node.file;
    const namespace = typeof options.namespace === 'string' && options.namespace !== '' ? `${options.namespace}/` : '';
    return `rbd:${options.pool}/${namespace}${options.image}`;
  } catch {
    return node.file;
  }
}
