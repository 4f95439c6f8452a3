// The device agent's run loop (`hallmark agent run`): enrol over EST when the state directory holds no
// certificate yet, then stay connected to the MQTT broker over TLS with the device certificate, publish
// a heartbeat on devices/<UDID>/heartbeat, renew the certificate inside its window and reconnect with
// the new one, and reconnect with backoff whenever the connection drops.
//
// Trust: the pinned Hallmark root is the only anchor, for the EST server and for the broker (whose
// server certificate Hallmark issued: src/broker/mosquitto.ts). A broker whose certificate does not
// chain to it is refused — the agent never sends its MQTT CONNECT there.
//
// Events (runAgent(...).events):
//   'enrolled'   EnrolmentInfo           the first certificate was issued and stored
//   'connected'  { broker, udid, serial } the MQTT session is up (CONNACK success)
//   'heartbeat'  { udid, at, serial, topic } a heartbeat was acknowledged (QoS 1 PUBACK)
//   'renewed'    EnrolmentInfo           the certificate was renewed; the agent reconnects with it
//   'refused'    { by, reason, code?, broker } the agent refused the broker (untrusted certificate) or
//                the broker refused the agent (TLS alert, e.g. certificate revoked, or a CONNACK error)
//   'error'      Error                   anything else (network, EST); emitted only while a listener exists
// None of these stop the loop: it retries with backoff until stop().

import { X509Certificate } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { enrol, readState, renewIfDue, STATE_FILES, type AgentServerOptions, type EnrolmentInfo } from './agent.js';
import type { DeviceKey } from './device-key.js';
import { EstClientError } from './est-client.js';

export interface RunAgentOptions extends AgentServerOptions {
  /** The device key (the agent does not close it). */
  readonly key: DeviceKey;
  /** State directory: cert.pem, chain.pem, enrolment.json (enrolled into when cert.pem is missing). */
  readonly stateDir: string;
  /** mqtts://host[:port] (default port 8883). Plain mqtt:// is refused. */
  readonly broker: string | URL;
  /** A claim "id:secret" for the first enrolment; without it the registered key enrols alone. */
  readonly claim?: string;
  /** Heartbeat interval. Default 30 s. */
  readonly heartbeatMs?: number;
  /** The device's own renewal threshold (percent of the lifetime). Default 66. */
  readonly renewAfterPercent?: number;
  /** Least time between two renewal checks (after a renewal too). Default 60 s. */
  readonly renewMinIntervalMs?: number;
  /** Renewal retry after a failed attempt. Default 5 min. */
  readonly renewRetryMs?: number;
  /** Reconnection backoff: first delay and cap (doubling, ±20 % jitter). Default 1 s .. 60 s. */
  readonly backoffMinMs?: number;
  readonly backoffMaxMs?: number;
  /** MQTT connect timeout (TCP + TLS + CONNACK). Default 30 s. */
  readonly connectTimeoutMs?: number;
  /** MQTT keepalive, seconds. Default 60. */
  readonly keepaliveSeconds?: number;
}

export interface RunningAgent {
  readonly events: EventEmitter;
  stop(): Promise<void>;
}

export interface RefusedEvent {
  /** 'agent': the broker's certificate is not trusted; 'broker': the broker refused the agent. */
  readonly by: 'agent' | 'broker';
  readonly reason: string;
  readonly code?: string | number;
  readonly broker: string;
}

export interface HeartbeatEvent { readonly udid: string; readonly at: string; readonly serial: string; readonly topic: string }
export interface ConnectedEvent { readonly broker: string; readonly udid: string; readonly serial: string }

/** Node/OpenSSL verification errors: the broker's certificate does not chain to the pinned root (or is not for the host). */
const UNTRUSTED_BROKER = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'SELF_SIGNED_CERT_IN_CHAIN', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'CERT_SIGNATURE_FAILURE', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'CERT_UNTRUSTED',
  'CERT_REJECTED', 'INVALID_CA', 'ERR_TLS_CERT_ALTNAME_INVALID', 'CERT_REVOKED', 'HOSTNAME_MISMATCH',
]);

const MAX_TIMER_MS = 2 ** 31 - 1;

/** Classifies a connection error: a refusal (either side) or undefined for an ordinary failure. */
export function classifyRefusal(err: unknown): Omit<RefusedEvent, 'broker'> | undefined {
  const e = err as { code?: unknown; message?: string };
  const message = e?.message ?? String(err);
  if (typeof e?.code === 'string' && UNTRUSTED_BROKER.has(e.code)) {
    return { by: 'agent', reason: `the broker's certificate is not trusted (pinned root only): ${message}`, code: e.code };
  }
  if (typeof e?.code === 'string' && /^ERR_SSL_.*ALERT/.test(e.code)) {
    return { by: 'broker', reason: `the broker refused the TLS handshake: ${message}`, code: e.code };
  }
  if (typeof e?.code === 'number' && e.code >= 0x80) {
    return { by: 'broker', reason: `the broker refused the connection: ${message}`, code: e.code };
  }
  return undefined;
}

function parseBroker(broker: string | URL): { url: string; host: string; port: number } {
  let u: URL;
  try {
    u = new URL(String(broker));
  } catch {
    throw new EstClientError('EST_BAD_OPTIONS', `bad broker URL ${JSON.stringify(String(broker))}: mqtts://HOST:PORT`);
  }
  if (u.protocol !== 'mqtts:') throw new EstClientError('EST_BAD_OPTIONS', `the broker URL must be mqtts:// (TLS with the device certificate), not ${u.protocol}`);
  const port = u.port === '' ? 8883 : Number(u.port);
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
  if (!host) throw new EstClientError('EST_BAD_OPTIONS', 'the broker URL has no host');
  return { url: `mqtts://${u.host}`, host, port };
}

function udidOf(cert: X509Certificate): string {
  return /^CN=(.*)$/m.exec(cert.subject)?.[1] ?? '';
}

class AgentLoop {
  readonly events = new EventEmitter();
  readonly #o: RunAgentOptions;
  readonly #broker: { url: string; host: string; port: number };
  readonly #trust: string;
  #stopped = false;
  #client: MqttClient | undefined;
  #heartbeat: NodeJS.Timeout | undefined;
  #reconnectTimer: NodeJS.Timeout | undefined;
  #renewTimer: NodeJS.Timeout | undefined;
  #startTimer: NodeJS.Timeout | undefined;
  #attempt = 0;
  #busy = new Set<Promise<unknown>>();

  constructor(options: RunAgentOptions) {
    this.#o = options;
    this.#broker = parseBroker(options.broker);
    this.#trust = Buffer.isBuffer(options.trust) ? options.trust.toString('utf8') : options.trust;
  }

  #error(err: unknown): void {
    if (this.events.listenerCount('error') > 0) this.events.emit('error', err instanceof Error ? err : new Error(String(err)));
  }

  #track<T>(p: Promise<T>): Promise<T> {
    this.#busy.add(p);
    void p.finally(() => this.#busy.delete(p)).catch(() => {});
    return p;
  }

  #backoff(): number {
    const min = this.#o.backoffMinMs ?? 1000;
    const max = this.#o.backoffMaxMs ?? 60_000;
    const base = Math.min(max, min * 2 ** Math.min(this.#attempt, 30));
    this.#attempt++;
    return Math.max(0, Math.round(base * (0.8 + Math.random() * 0.4)));
  }

  start(): void {
    void this.#track(this.#start());
  }

  async #start(): Promise<void> {
    if (this.#stopped) return;
    try {
      if (!existsSync(join(this.#o.stateDir, STATE_FILES.cert))) {
        const info = await enrol({ ...this.#server(), key: this.#o.key, stateDir: this.#o.stateDir, claim: this.#o.claim });
        if (this.#stopped) return;
        this.events.emit('enrolled', info);
      }
    } catch (err) {
      this.#error(err);
      if (!this.#stopped) this.#startTimer = setTimeout(() => this.start(), this.#backoff());
      return;
    }
    this.#attempt = 0;
    this.#connect();
    this.#renewTimer = setTimeout(() => this.#renewCheck(), 0);
  }

  #server(): AgentServerOptions {
    const o = this.#o;
    return { server: o.server, trust: o.trust, label: o.label, timeoutMs: o.timeoutMs, minVersion: o.minVersion, maxVersion: o.maxVersion };
  }

  #connect(): void {
    if (this.#stopped) return;
    void this.#track(this.#connectNow().catch((err) => {
      this.#error(err);
      this.#scheduleReconnect();
    }));
  }

  async #connectNow(): Promise<void> {
    const state = await readState(this.#o.stateDir);
    if (this.#stopped) return;
    if (!state.cert.publicKey.export({ type: 'spki', format: 'der' }).equals(this.#o.key.publicKeySpki)) {
      throw new EstClientError('EST_BAD_OPTIONS', `the certificate in ${this.#o.stateDir} is not for the key ${this.#o.key.description}`);
    }
    const udid = udidOf(state.cert);
    const serial = state.cert.serialNumber.toLowerCase();
    const creds = this.#o.key.tlsCredentials();
    const tlsKey = 'key' in creds
      ? { key: creds.key.export({ type: 'pkcs8', format: 'pem' }) as string }
      : { privateKeyEngine: creds.privateKeyEngine, privateKeyIdentifier: creds.privateKeyIdentifier };
    const options: IClientOptions = {
      protocol: 'mqtts',
      host: this.#broker.host,
      port: this.#broker.port,
      // The pinned root replaces Node's default store: nothing else is trusted for the broker.
      ca: this.#trust,
      cert: state.certPem + state.chainPem,
      ...tlsKey,
      rejectUnauthorized: true,
      minVersion: this.#o.minVersion ?? 'TLSv1.2',
      ...(this.#o.maxVersion ? { maxVersion: this.#o.maxVersion } : {}),
      protocolVersion: 5,
      clientId: udid || this.#o.key.udid,
      clean: true,
      keepalive: this.#o.keepaliveSeconds ?? 60,
      reconnectPeriod: 0, // this loop reconnects itself (with the current certificate, with backoff)
      connectTimeout: this.#o.connectTimeoutMs ?? 30_000,
    } as unknown as IClientOptions; // the TLS options (minVersion, privateKeyEngine, …) go through to tls.connect
    const client = mqtt.connect(options);
    this.#client = client;
    let refused = false;
    let closed = false;
    client.on('connect', () => {
      if (this.#client !== client || this.#stopped) return;
      this.#attempt = 0;
      this.events.emit('connected', { broker: this.#broker.url, udid, serial } satisfies ConnectedEvent);
      this.#startHeartbeat(client, udid, serial);
    });
    client.on('error', (err) => {
      if (this.#client !== client || this.#stopped) return;
      const refusal = classifyRefusal(err);
      if (refusal) {
        if (refused) return; // one refusal per attempt
        refused = true;
        this.events.emit('refused', { ...refusal, broker: this.#broker.url } satisfies RefusedEvent);
      } else {
        this.#error(err);
      }
    });
    client.on('close', () => {
      if (closed) return;
      closed = true;
      if (this.#client !== client) return; // replaced on purpose (renewal) or stopped
      this.#stopHeartbeat();
      this.#client = undefined;
      client.end(true);
      this.#scheduleReconnect();
    });
  }

  #scheduleReconnect(): void {
    if (this.#stopped || this.#reconnectTimer) return;
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = undefined;
      this.#connect();
    }, this.#backoff());
  }

  #startHeartbeat(client: MqttClient, udid: string, serial: string): void {
    this.#stopHeartbeat();
    const topic = `devices/${udid}/heartbeat`;
    const beat = (): void => {
      if (this.#client !== client || !client.connected) return;
      const payload = { udid, at: new Date().toISOString(), serial };
      client.publish(topic, JSON.stringify(payload), { qos: 1 }, (err) => {
        if (err) {
          if (this.#client === client && !this.#stopped) this.#error(err);
          return;
        }
        if (!this.#stopped) this.events.emit('heartbeat', { ...payload, topic } satisfies HeartbeatEvent);
      });
    };
    beat();
    this.#heartbeat = setInterval(beat, this.#o.heartbeatMs ?? 30_000);
  }

  #stopHeartbeat(): void {
    if (this.#heartbeat) clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
  }

  #renewCheck(): void {
    this.#renewTimer = undefined;
    if (this.#stopped) return;
    void this.#track(this.#renew());
  }

  async #renew(): Promise<void> {
    const minInterval = this.#o.renewMinIntervalMs ?? 60_000;
    let next: number;
    try {
      const outcome = await renewIfDue({ ...this.#server(), key: this.#o.key, stateDir: this.#o.stateDir, renewAfterPercent: this.#o.renewAfterPercent });
      if (this.#stopped) return;
      if (outcome.renewed) {
        this.events.emit('renewed', outcome.info satisfies EnrolmentInfo);
        this.#reconnectWithNewCertificate();
        next = minInterval;
      } else {
        next = Math.max(minInterval, outcome.dueAt.getTime() - Date.now());
      }
    } catch (err) {
      if (this.#stopped) return;
      this.#error(err);
      next = this.#o.renewRetryMs ?? 300_000;
    }
    this.#renewTimer = setTimeout(() => this.#renewCheck(), Math.min(next, MAX_TIMER_MS));
  }

  #reconnectWithNewCertificate(): void {
    const old = this.#client;
    this.#client = undefined;
    this.#stopHeartbeat();
    if (this.#reconnectTimer) { clearTimeout(this.#reconnectTimer); this.#reconnectTimer = undefined; }
    this.#attempt = 0;
    if (old) old.end(false, {}, () => this.#connect());
    else this.#connect();
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#stopHeartbeat();
    for (const t of [this.#reconnectTimer, this.#renewTimer, this.#startTimer]) if (t) clearTimeout(t);
    this.#reconnectTimer = this.#renewTimer = this.#startTimer = undefined;
    await Promise.allSettled([...this.#busy]);
    const client = this.#client;
    this.#client = undefined;
    if (client) {
      await Promise.race([
        new Promise<void>((resolve) => client.end(false, {}, () => resolve())),
        new Promise<void>((resolve) => setTimeout(resolve, 2000).unref()),
      ]);
      if (!client.disconnected) client.end(true);
    }
  }
}

/**
 * Starts the agent's run loop (see the header comment). Returns at once; progress is reported
 * through `events`. stop() ends the MQTT session cleanly and clears every timer.
 */
export function runAgent(options: RunAgentOptions): RunningAgent {
  const loop = new AgentLoop(options);
  loop.start();
  return { events: loop.events, stop: () => loop.stop() };
}
