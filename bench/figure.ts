// What a benchmark module reports. Every bench/*.bench.ts exports `run(): Promise<Figure[]>`.

export interface Figure {
  /** Stable name, e.g. "durable issuance throughput (sqlite)". */
  readonly name: string;
  readonly value: number;
  /** Unit of value and ceiling, e.g. "certificates/s". */
  readonly unit: string;
  /** What the platform allows for the same work (same unit), or null when there is no meaningful one. */
  readonly ceiling: number | null;
  /** value / ceiling, or null. */
  readonly ratio: number | null;
  /** Extra facts for the human table only (not part of the --json line). */
  readonly notes?: string;
}

export function figure(name: string, value: number, unit: string, ceiling: number | null, notes?: string): Figure {
  return { name, value, unit, ceiling, ratio: ceiling ? value / ceiling : null, notes };
}

/** Progress and diagnostics go to stderr so `--json` output on stdout stays one object per line. */
export const log = (msg: string): void => { process.stderr.write(`[bench] ${msg}\n`); };
