// A fleet of simulated devices in one process, for `npm run demo` (src/demo/demo.ts) and
// `hallmark simulate`: each device has its own P-256 key (made with createECDH, as
// bench/est-enrolment.bench.ts does), enrols over EST with a claim (src/agent/agent.ts enrol), then
// connects to the MQTT broker over TLS with its certificate, trusting only the pinned root, and
// publishes a QoS 1 heartbeat on devices/<UDID>/heartbeat at a fixed interval.
//
// The MQTT client is the mqtt package used directly (not runAgent), so that one device's connection
// can be dropped and re-made on demand (SimulatedDevice.reconnect) and the outcome of that one attempt
// — connected, or refused with the error — is returned to the caller. A session the broker ends (an MQTT v5
// DISCONNECT, e.g. 0x98 "administrative action" when Hallmark disconnects a revoked or suspended device)
// is recorded with its reason and time; the device does not reconnect by itself.

import { createECDH, createPrivateKey, type KeyObject } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { join } from 'node:path';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { enrol, readState, type EnrolmentInfo } from '../agent/agent.js';
import { deviceKeyFromKeyObject, type DeviceKey } from '../agent/device-key.js';

export interface FleetOptions {
  /** https://host:port of the Hallmark server. */
  readonly server: string;
  /** mqtts://host:port of the broker. */
  readonly broker: string;
  /** PEM of the pinned root: the only trust anchor for the server and the broker. */
  readonly trust: string;
  /** A claim "id:secret" with enough uses for every device. */
  readonly claim: string;
  /** Where each device keeps cert.pem, chain.pem, enrolment.json (DIR/device-NNNN). */
  readonly stateDir: string;
  readonly devices: number;
  /** Heartbeat interval. Default 1 s. */
  readonly heartbeatMs?: number;
  /** Enrolments (and connections) in flight at once. Default 16. */
  readonly concurrency?: number;
  /** One connection attempt (TCP + TLS + CONNACK) times out after this. Default 15 s. */
  readonly connectTimeoutMs?: number;
  readonly log?: (line: string) => void;
}

export interface ConnectOutcome {
  readonly ok: boolean;
  /** The error when refused or failed: its code (OpenSSL / Node / MQTT reason) and message. */
  readonly code?: string | number;
  readonly error?: string;
  readonly ms: number;
}

/** A P-256 private key from createECDH (no KeyGenJob: see bench/est-enrolment.bench.ts). */
export function newP256Key(): KeyObject {
  const ecdh = createECDH('prime256v1');
  ecdh.generateKeys();
  const point = ecdh.getPublicKey();
  return createPrivateKey({
    key: {
      kty: 'EC', crv: 'P-256',
      x: point.subarray(1, 33).toString('base64url'),
      y: point.subarray(33, 65).toString('base64url'),
      d: Buffer.from(ecdh.getPrivateKey().toString('hex').padStart(64, '0'), 'hex').toString('base64url'),
    },
    format: 'jwk',
  });
}

function brokerAddress(broker: string): { host: string; port: number } {
  const u = new URL(broker);
  if (u.protocol !== 'mqtts:') throw new Error(`the broker URL must be mqtts://HOST:PORT, not ${broker}`);
  return { host: u.hostname.replace(/^\[(.*)\]$/, '$1'), port: u.port === '' ? 8883 : Number(u.port) };
}

/**
 * One TLS + MQTT connection attempt with the given certificate (PEM, chain after it) and key. Resolves
 * with the client once CONNACK arrives, or with the error (never rejects).
 */
export function connectOnce(options: {
  broker: string; trust: string; certPem: string; key: KeyObject | string; clientId: string; timeoutMs?: number;
}): Promise<{ outcome: ConnectOutcome; client?: MqttClient }> {
  const { host, port } = brokerAddress(options.broker);
  const started = performance.now();
  return new Promise((resolve) => {
    let done = false;
    let client: MqttClient | undefined;
    const finish = (outcome: Omit<ConnectOutcome, 'ms'>, keep?: MqttClient): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (!keep && client) client.end(true);
      resolve({ outcome: { ...outcome, ms: performance.now() - started }, ...(keep ? { client: keep } : {}) });
    };
    const fail = (err: unknown): void => {
      const e = err as { code?: string | number; message?: string };
      finish({ ok: false, ...(e?.code !== undefined ? { code: e.code } : {}), error: (e?.message ?? String(err)).trim() });
    };
    const timer = setTimeout(() => fail(Object.assign(new Error('connection timed out'), { code: 'TIMEOUT' })), options.timeoutMs ?? 15_000);
    const key = typeof options.key === 'string' ? options.key : (options.key.export({ type: 'pkcs8', format: 'pem' }) as string);
    try {
      client = mqtt.connect({
        protocol: 'mqtts', host, port,
        ca: options.trust, cert: options.certPem, key,
        rejectUnauthorized: true,
        minVersion: 'TLSv1.2',
        protocolVersion: 5,
        clientId: options.clientId,
        clean: true,
        keepalive: 30,
        reconnectPeriod: 0,
        connectTimeout: options.timeoutMs ?? 15_000,
      } as unknown as IClientOptions);
    } catch (err) {
      fail(err);
      return;
    }
    const c = client;
    c.on('connect', () => finish({ ok: true }, c));
    c.on('error', (err) => fail(err));
    c.on('close', () => fail(Object.assign(new Error('the connection closed before CONNACK'), { code: 'CLOSED' })));
  });
}

/** A session the broker ended: an MQTT v5 DISCONNECT with its reason, or the connection simply closing. */
export interface BrokerDisconnect {
  /** performance.now() when it was seen. */
  readonly at: number;
  readonly reasonCode?: number;
  readonly reason: string;
}

/** MQTT v5 DISCONNECT reason codes a broker sends (§3.14.2.1), the common ones. */
const DISCONNECT_REASONS: Readonly<Record<number, string>> = {
  0x00: 'normal disconnection', 0x80: 'unspecified error', 0x81: 'malformed packet', 0x82: 'protocol error', 0x87: 'not authorized',
  0x89: 'server busy', 0x8b: 'server shutting down', 0x8d: 'keep alive timeout', 0x8e: 'session taken over', 0x90: 'topic name invalid',
  0x93: 'receive maximum exceeded', 0x95: 'packet too large', 0x97: 'quota exceeded', 0x98: 'administrative action', 0x9c: 'use another server',
};

export function disconnectReason(code: number | undefined): string {
  if (code === undefined) return 'connection closed by the broker';
  return `DISCONNECT 0x${code.toString(16).padStart(2, '0')} ${DISCONNECT_REASONS[code] ?? 'reason'}`;
}

/** A short, device-independent reason for a refused connection (for grouping in the summary). */
export function connectionRefusal(o: ConnectOutcome): string {
  const text = `${o.code ?? ''} ${o.error ?? ''}`;
  if (/certificate revoked|alert number 44/i.test(text)) return 'TLS alert: certificate revoked';
  if (/unknown ca|alert number 48/i.test(text)) return 'TLS alert: unknown CA';
  if (/certificate expired|alert number 45/i.test(text)) return 'TLS alert: certificate expired';
  if (/key values mismatch/i.test(text)) return 'the certificate does not match the key';
  if (/TIMEOUT|timed out/i.test(text)) return 'timed out';
  if (/ECONNREFUSED/.test(text)) return 'connection refused (is the broker running?)';
  if (/ECONNRESET|socket hang up|CLOSED|disconnected before/i.test(text)) return 'connection closed by the broker during the handshake';
  return (o.code !== undefined ? `${o.code}` : (o.error ?? 'refused')).slice(0, 120);
}

export class SimulatedDevice {
  readonly key: DeviceKey;
  readonly privateKey: KeyObject;
  enrolment: EnrolmentInfo | undefined;
  enrolMs: number | undefined;
  connectMs: number[] = [];
  heartbeatMs: number[] = [];
  heartbeats = 0;
  /** Heartbeats the broker refused (MQTT v5 PUBACK with an error reason, e.g. 0x87 not authorized). */
  heartbeatsRefused = 0;
  errors: string[] = [];
  /** Why the last enrolment or connection attempt was refused, when it was. */
  refusal: string | undefined;
  /** Sessions the broker ended. */
  disconnects: BrokerDisconnect[] = [];
  certPem = '';
  #client: MqttClient | undefined;
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;

  constructor(readonly index: number, readonly stateDir: string, readonly o: FleetOptions) {
    this.privateKey = newP256Key();
    this.key = deviceKeyFromKeyObject(this.privateKey, `simulated device ${index}`);
  }

  get udid(): string { return this.enrolment?.udid ?? this.key.udid; }
  get connected(): boolean { return this.#client?.connected === true; }

  async enrol(): Promise<EnrolmentInfo> {
    const t0 = performance.now();
    try {
      this.enrolment = await enrol({ server: this.o.server, trust: this.o.trust, key: this.key, stateDir: this.stateDir, claim: this.o.claim });
    } catch (err) {
      const e = err as { code?: unknown; message?: string };
      this.refusal = `enrolment: ${typeof e.code === 'string' ? `${e.code} ` : ''}${e.message ?? String(err)}`.trim();
      throw err;
    }
    this.refusal = undefined;
    this.enrolMs = performance.now() - t0;
    const state = await readState(this.stateDir);
    this.certPem = state.certPem + state.chainPem;
    return this.enrolment;
  }

  /** Connects (dropping any current connection first) and starts heartbeats when it succeeds. */
  async connect(): Promise<ConnectOutcome> {
    this.#drop();
    if (this.#stopped) return { ok: false, error: 'stopped', ms: 0 };
    const { outcome, client } = await connectOnce({
      broker: this.o.broker, trust: this.o.trust, certPem: this.certPem, key: this.privateKey, clientId: this.udid, timeoutMs: this.o.connectTimeoutMs,
    });
    if (!client) {
      this.errors.push(`${outcome.code ?? ''} ${outcome.error}`.trim());
      this.refusal = `connection: ${connectionRefusal(outcome)}`;
      return outcome;
    }
    if (this.#stopped) { client.end(true); return { ok: false, error: 'stopped', ms: outcome.ms }; }
    this.refusal = undefined;
    this.connectMs.push(outcome.ms);
    this.#client = client;
    let ended: BrokerDisconnect | undefined;
    client.on('error', (err) => this.errors.push(err.message));
    client.on('disconnect', (packet) => {
      ended = { at: performance.now(), reasonCode: packet.reasonCode ?? 0, reason: disconnectReason(packet.reasonCode ?? 0) };
    });
    client.on('close', () => {
      if (this.#client !== client) return; // we closed it ourselves
      this.disconnects.push(ended ?? { at: performance.now(), reason: disconnectReason(undefined) });
      this.#drop();
    });
    this.#startHeartbeat(client);
    return outcome;
  }

  /** Forces a new connection (the device "comes back"): the old session is closed first. */
  reconnect(): Promise<ConnectOutcome> { return this.connect(); }

  #startHeartbeat(client: MqttClient): void {
    const topic = `devices/${this.udid}/heartbeat`;
    const beat = (): void => {
      if (this.#client !== client || !client.connected) return;
      const t0 = performance.now();
      client.publish(topic, JSON.stringify({ udid: this.udid, at: new Date().toISOString(), serial: this.enrolment?.serial }), { qos: 1 }, (err) => {
        if (err) {
          // A PUBACK with an error reason (MQTT v5) comes back as an error with its code; a dropped connection too.
          if (typeof (err as { code?: unknown }).code === 'number') this.heartbeatsRefused++;
          return;
        }
        this.heartbeats++;
        this.heartbeatMs.push(performance.now() - t0);
      });
    };
    beat();
    this.#timer = setInterval(beat, this.o.heartbeatMs ?? 1000);
  }

  #drop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    const c = this.#client;
    this.#client = undefined;
    if (c) c.end(true);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    const c = this.#client;
    this.#client = undefined;
    if (c) {
      await Promise.race([
        new Promise<void>((r) => c.end(false, {}, () => r())),
        new Promise<void>((r) => setTimeout(r, 1000).unref()),
      ]);
      c.end(true);
    }
  }
}

/** p-th percentile (0..100) of the values, nearest rank; 0 when empty. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}

export interface Latency { readonly p50: number; readonly p99: number; readonly n: number }
export const latency = (values: readonly number[]): Latency => ({ p50: round(percentile(values, 50)), p99: round(percentile(values, 99)), n: values.length });
const round = (n: number): number => Math.round(n * 10) / 10;

async function pool<T>(items: readonly T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, items.length)) }, worker));
}

export interface FleetStats {
  readonly devices: number;
  readonly enrolled: number;
  readonly connected: number;
  /** Devices connected when the stats were taken. */
  readonly connectedNow: number;
  readonly heartbeats: number;
  /** Heartbeats the broker refused (PUBACK error reason). */
  readonly heartbeatsRefused: number;
  /** Devices whose last enrolment or connection attempt was refused, by reason. */
  readonly refused: { readonly count: number; readonly reasons: Readonly<Record<string, number>> };
  /** Sessions the broker ended, by reason (a device counts once per session). */
  readonly disconnected: { readonly count: number; readonly reasons: Readonly<Record<string, number>> };
  readonly latencyMs: { readonly enrol: Latency; readonly connect: Latency; readonly heartbeat: Latency };
}

export class Fleet {
  readonly devices: SimulatedDevice[];
  readonly #log: (line: string) => void;

  constructor(readonly o: FleetOptions) {
    this.#log = o.log ?? (() => {});
    this.devices = Array.from({ length: o.devices }, (_, i) => new SimulatedDevice(i, join(o.stateDir, `device-${String(i).padStart(4, '0')}`), o));
  }

  #progress(what: string, done: number, force = false): void {
    const n = this.devices.length;
    const step = Math.max(1, Math.ceil(n / 10));
    if (force || done % step === 0 || done === n) this.#log(`  ${what} ${done}/${n}`);
  }

  /** Enrols every device (concurrently, up to `concurrency`). Failures are recorded, not thrown. */
  async enrolAll(): Promise<number> {
    let done = 0;
    let ok = 0;
    await pool(this.devices, this.o.concurrency ?? 16, async (d) => {
      try {
        await d.enrol();
        ok++;
      } catch (err) {
        d.errors.push(`enrol: ${(err as Error).message}`);
        this.#log(`  device ${d.index}: enrolment failed: ${(err as Error).message}`);
      }
      this.#progress('enrolled', ++done);
    });
    return ok;
  }

  /** Connects every enrolled device. */
  async connectAll(): Promise<number> {
    let done = 0;
    let ok = 0;
    await pool(this.devices.filter((d) => d.enrolment), this.o.concurrency ?? 16, async (d) => {
      const r = await d.connect();
      if (r.ok) ok++;
      else this.#log(`  device ${d.index}: connection failed: ${r.code ?? ''} ${r.error}`);
      this.#progress('connected', ++done);
    });
    return ok;
  }

  heartbeats(except?: SimulatedDevice): number {
    return this.devices.reduce((n, d) => (d === except ? n : n + d.heartbeats), 0);
  }

  stats(): FleetStats {
    const ds = this.devices;
    const group = (items: readonly string[]): Record<string, number> => {
      const out: Record<string, number> = {};
      for (const r of items) out[r] = (out[r] ?? 0) + 1;
      return out;
    };
    const refusals = ds.flatMap((d) => (d.refusal ? [d.refusal] : []));
    const disconnects = ds.flatMap((d) => d.disconnects.map((x) => x.reason));
    return {
      devices: ds.length,
      enrolled: ds.filter((d) => d.enrolment).length,
      connected: ds.filter((d) => d.connectMs.length > 0).length,
      connectedNow: ds.filter((d) => d.connected).length,
      heartbeats: this.heartbeats(),
      heartbeatsRefused: ds.reduce((n, d) => n + d.heartbeatsRefused, 0),
      refused: { count: refusals.length, reasons: group(refusals) },
      disconnected: { count: disconnects.length, reasons: group(disconnects) },
      latencyMs: {
        enrol: latency(ds.flatMap((d) => (d.enrolMs === undefined ? [] : [d.enrolMs]))),
        connect: latency(ds.flatMap((d) => d.connectMs)),
        heartbeat: latency(ds.flatMap((d) => d.heartbeatMs)),
      },
    };
  }

  async stop(): Promise<void> {
    await Promise.all(this.devices.map((d) => d.stop()));
  }
}

export function formatStats(s: FleetStats): string[] {
  const l = (x: Latency): string => `p50 ${x.p50} ms, p99 ${x.p99} ms (n=${x.n})`;
  const reasons = (r: Readonly<Record<string, number>>): string[] =>
    Object.entries(r).sort((a, b) => b[1] - a[1]).map(([why, n]) => `             ${n} × ${why}`);
  return [
    `  enrolled   ${s.enrolled}/${s.devices}`,
    `  connected  ${s.connected}/${s.devices} (${s.connectedNow} still connected)`,
    `  refused    ${s.refused.count}`,
    ...reasons(s.refused.reasons),
    `  disconnected by the broker ${s.disconnected.count}`,
    ...reasons(s.disconnected.reasons),
    `  heartbeats ${s.heartbeats}${s.heartbeatsRefused ? ` (${s.heartbeatsRefused} refused by the broker)` : ''}`,
    `  latency    enrol ${l(s.latencyMs.enrol)}`,
    `             connect ${l(s.latencyMs.connect)}`,
    `             heartbeat (PUBACK) ${l(s.latencyMs.heartbeat)}`,
  ];
}
