import type { QmpSession } from './qmp-session.ts';

/** The parts of `query-named-block-nodes` entries we use (QMP reference: BlockDeviceInfo). */
export interface BlockNodeInfo {
  'node-name': string;
  drv: string;
  file: string;
  ro: boolean;
  image: {
    filename: string;
    format: string;
    'virtual-size': number;
    'actual-size'?: number;
    'backing-filename'?: string;
  };
  'backing_file'?: string;
  'backing_file_depth'?: number;
}

interface DebugBlockGraph {
  nodes: Array<{ id: number; type: string; name: string }>;
  edges: Array<{ parent: number; child: number; name: string }>;
}

export async function queryNamedBlockNodes(qmp: QmpSession): Promise<BlockNodeInfo[]> {
  return qmp.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true });
}

/**
 * Names of every named node in the graph. Unlike `query-named-block-nodes` this reads nothing from the
 * images (that command reads each qcow2's bitmap directory and fails on a disk with I/O errors), so it
 * still answers for a VM whose storage is failing: exactly when a commit must still be driven to its end.
 */
export async function blockNodeNames(qmp: QmpSession): Promise<Set<string>> {
  const graph = await qmp.execute<DebugBlockGraph>('x-debug-query-block-graph');
  return new Set(graph.nodes.filter((node) => node.type === 'block-driver' && node.name !== '').map((node) => node.name));
}

/**
 * Names of the nodes attached directly to a block backend (a guest device or an export): the active layers.
 * qemu-storage-daemon has no devices, so `query-block` is empty there; the debug graph is the one view that
 * works for both a VM and a daemon. Backends whose names are in `ignoreBackendNames` are skipped.
 */
export async function rootNodeNames(qmp: QmpSession): Promise<string[]> {
  const graph = await qmp.execute<DebugBlockGraph>('x-debug-query-block-graph');
  const byId = new Map(graph.nodes.map((node) => [node.id, node]));
  const roots = new Set<string>();
  for (const edge of graph.edges) {
    const parent = byId.get(edge.parent);
    const child = byId.get(edge.child);
    if (parent?.type === 'block-backend' && edge.name === 'root' && child?.type === 'block-driver' && child.name !== '') {
      roots.add(child.name);
    }
  }
  return [...roots];
}

/** The node whose `backing` child is `nodeName`, if any: who sits on top of it in a chain. */
export async function parentByBacking(qmp: QmpSession, nodeName: string): Promise<string | undefined> {
  const graph = await qmp.execute<DebugBlockGraph>('x-debug-query-block-graph');
  const child = graph.nodes.find((node) => node.name === nodeName);
  if (!child) return undefined;
  const edge = graph.edges.find((e) => e.child === child.id && e.name === 'backing');
  return edge ? graph.nodes.find((node) => node.id === edge.parent)?.name : undefined;
}

/**
 * The protocol node under a format node, e.g. the 'file' or 'rbd' node under a qcow2 node. Filters in
 * between (throttle, blkdebug, copy-on-read) are walked through: they change how I/O flows, not where the
 * image lives. `filterNames` says which node names are filters (query-named-block-nodes knows the drivers).
 */
export async function protocolChildOf(qmp: QmpSession, nodeName: string, filterNames: ReadonlySet<string> = new Set()): Promise<string | undefined> {
  const graph = await qmp.execute<DebugBlockGraph>('x-debug-query-block-graph');
  let current = graph.nodes.find((node) => node.name === nodeName);
  for (let depth = 0; current && depth < 8; depth++) {
    const parentId = current.id;
    const edge = graph.edges.find((e) => e.parent === parentId && (e.name === 'file' || e.name === 'image'));
    const child = edge ? graph.nodes.find((node) => node.id === edge.child) : undefined;
    if (!child || !filterNames.has(child.name)) return child?.name;
    current = child;
  }
  return undefined;
}

/** The `backing` child of a node: the image below it in the chain. */
export async function backingChildOf(qmp: QmpSession, nodeName: string): Promise<string | undefined> {
  const graph = await qmp.execute<DebugBlockGraph>('x-debug-query-block-graph');
  const parent = graph.nodes.find((node) => node.name === nodeName);
  if (!parent) return undefined;
  const edge = graph.edges.find((e) => e.parent === parent.id && e.name === 'backing');
  return edge ? graph.nodes.find((node) => node.id === edge.child)?.name : undefined;
}

/** The `file` child of a node: what a filter (copy-before-write, snapshot-access) passes its I/O to. */
export async function fileChildOf(qmp: QmpSession, nodeName: string): Promise<string | undefined> {
  const graph = await qmp.execute<DebugBlockGraph>('x-debug-query-block-graph');
  const parent = graph.nodes.find((node) => node.name === nodeName);
  if (!parent) return undefined;
  const edge = graph.edges.find((e) => e.parent === parent.id && e.name === 'file');
  return edge ? graph.nodes.find((node) => node.id === edge.child)?.name : undefined;
}
