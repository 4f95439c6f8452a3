// `hallmark agent enroll|reenroll`: the device side of EST, for a device (or a factory station acting
// for one). Talks only to the server given, trusting only the root given. Secrets — the claim secret,
// a token PIN, a key passphrase — are taken from files or the environment when possible, and are never
// printed or logged.

import { readFileSync } from 'node:fs';
import { reenrol, enrol, renewIfDue, type EnrolmentInfo } from '../../agent/agent.js';
import { openDeviceKey, type DeviceKey } from '../../agent/device-key.js';
import { EstClientError } from '../../agent/est-client.js';
import { runAgent, type ConnectedEvent, type HeartbeatEvent, type RefusedEvent } from '../../agent/run.js';
import { HallmarkError } from '../../errors.js';
import { flag, info, out, required, str, UsageError, type Command, type ParsedArgs } from '../io.js';

const KEY_HELP = `--key FILE|pkcs11:URI   the device key: a PEM or DER PKCS#8 file (encrypted: passphrase from
                         --key-passphrase-file or HALLMARK_KEY_PASSPHRASE), or an RFC 7512 URI naming a
                         token key by token and id (pkcs11:token=…;id=%01;type=private). The PIN comes from
                         the URI's pin-value or HALLMARK_PKCS11_PIN; the module from --pkcs11-module,
                         the URI's module-path, HALLMARK_PKCS11_MODULE or PKCS11_MODULE_PATH. TLS client
                         authentication with a token key uses the OpenSSL pkcs11 engine (libengine-pkcs11-openssl).`;

const COMMON = `--server URL            https://host:port of the Hallmark server
  --trust ROOT.pem         the Hallmark root certificate: the ONLY trust anchor for the server and the CAs
  --label L                EST label (product or line name)
  --tls 1.2|1.3            pin the TLS version (default: negotiate 1.2 or 1.3)
  --timeout SECONDS        per request (default 30)
  --json                   print the result as JSON`;

const common = {
  server: { type: 'string' },
  trust: { type: 'string' },
  key: { type: 'string' },
  'key-passphrase-file': { type: 'string' },
  'pkcs11-module': { type: 'string' },
  label: { type: 'string' },
  out: { type: 'string' },
  tls: { type: 'string' },
  timeout: { type: 'string' },
  json: { type: 'boolean' },
} as const;

function readText(path: string, what: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw new HallmarkError('BAD_REQUEST', `cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
  }
}

function secretFromFile(path: string, what: string): string {
  return readText(path, what).replace(/\r?\n$/, '');
}

async function openKey(args: ParsedArgs, spec: string): Promise<DeviceKey> {
  const file = str(args, 'key-passphrase-file');
  const passphrase = file ? secretFromFile(file, 'the key passphrase file') : process.env.HALLMARK_KEY_PASSPHRASE;
  return openDeviceKey(spec, { passphrase: passphrase || undefined, module: str(args, 'pkcs11-module') });
}

function serverOptions(args: ParsedArgs, usage: string) {
  const server = required(args, 'server', usage);
  const trust = readText(required(args, 'trust', usage), 'the trust anchor');
  const tls = str(args, 'tls');
  if (tls !== undefined && tls !== '1.2' && tls !== '1.3') throw new UsageError(`--tls must be 1.2 or 1.3\n\n${usage}`);
  const version = tls === undefined ? undefined : (`TLSv${tls}` as 'TLSv1.2' | 'TLSv1.3');
  const timeout = str(args, 'timeout');
  if (timeout !== undefined && !/^\d{1,4}$/.test(timeout)) throw new UsageError('--timeout must be whole seconds');
  return { server, trust, label: str(args, 'label'), minVersion: version, maxVersion: version, timeoutMs: timeout === undefined ? undefined : Number(timeout) * 1000 };
}

function report(result: EnrolmentInfo, json: boolean, what: string): void {
  if (json) {
    const { certificate: _c, chain: _ch, ...rest } = result;
    out(JSON.stringify({ ...rest, chainLength: result.chain.length }, null, 2));
    return;
  }
  out([
    `${what} device ${result.udid} (${result.authenticator}${result.channelBinding ? `, channel binding ${result.channelBinding}` : ''}${result.tlsVersion ? `, ${result.tlsVersion}` : ''}${result.rekeyed ? ', new key' : ''})`,
    `  serial     ${result.serial}`,
    `  subject    ${result.subject}`,
    `  valid      ${result.notBefore} .. ${result.notAfter}`,
    `  cert       ${result.files.cert}`,
    `  chain      ${result.files.chain} (${result.chain.length} CA certificate${result.chain.length === 1 ? '' : 's'})`,
  ].join('\n'));
}

/** EstClientError is rendered here, like main.ts renders a HallmarkError: message and code, exit 1. */
async function guarded(name: string, fn: () => Promise<number>): Promise<number> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof EstClientError) {
      process.stderr.write(`hallmark ${name}: ${err.message} [${err.code}${err.status ? `, HTTP ${err.status}` : ''}]\n`);
      if (err.retryAfterSeconds !== undefined) info(`retry after ${err.retryAfterSeconds} s`);
      return 1;
    }
    throw err;
  }
}

export const agentEnrollCommand: Command = {
  name: 'agent enroll',
  summary: 'device side: enrol over EST (claim, birth certificate or registered key) and store the certificate',
  usage: `Usage: hallmark agent enroll --server URL --trust ROOT.pem --key FILE|pkcs11:URI
         [--claim ID:SECRET | --claim-file FILE | --cert BIRTH.pem [--chain FILE]] [--label L] [--out DIR]

Fetches the CA certificates (each must chain to --trust), makes a CSR with the device key, enrols
and checks the issued certificate (chains to --trust, carries the device key), then writes
DIR/cert.pem, DIR/chain.pem (CA chain without the root) and DIR/enrolment.json. The key is not written.
Authentication, the first that applies:
  --claim ID:SECRET        a claim (hallmark claim create); better --claim-file FILE or HALLMARK_CLAIM,
                           which keep the secret out of the process list
  --cert BIRTH.pem         a birth certificate for the key, presented as TLS client certificate
                           (--chain FILE: its intermediates)
  (neither)                the key itself is registered: the CSR carries the TLS channel binding
  ${KEY_HELP}
  ${COMMON}
  --out DIR                state directory (default ./hallmark-agent)`,
  options: { ...common, claim: { type: 'string' }, 'claim-file': { type: 'string' }, cert: { type: 'string' }, chain: { type: 'string' } },
  async run(args) {
    const usage = this.usage;
    return guarded(this.name, async () => {
      const keySpec = required(args, 'key', usage);
      const server = serverOptions(args, usage);
      const claimFile = str(args, 'claim-file');
      const claim = str(args, 'claim') ?? (claimFile ? secretFromFile(claimFile, 'the claim file') : process.env.HALLMARK_CLAIM || undefined);
      const birth = str(args, 'cert');
      if (claim !== undefined && birth !== undefined) throw new UsageError(`give a claim or --cert, not both\n\n${usage}`);
      if (str(args, 'chain') !== undefined && birth === undefined) throw new UsageError('--chain goes with --cert');
      if (claim !== undefined && !/^[^:\s]+:\S+$/.test(claim)) throw new UsageError('the claim must be ID:SECRET');
      const key = await openKey(args, keySpec);
      try {
        const result = await enrol({
          ...server,
          key,
          stateDir: str(args, 'out') ?? 'hallmark-agent',
          claim,
          birthCertificate: birth === undefined ? undefined : readText(birth, 'the birth certificate'),
          birthChain: str(args, 'chain') === undefined ? undefined : readText(str(args, 'chain')!, 'the birth certificate chain'),
        });
        report(result, flag(args, 'json'), 'Enrolled');
        return 0;
      } finally {
        await key.close();
      }
    });
  },
};

export const agentReenrollCommand: Command = {
  name: 'agent reenroll',
  summary: 'device side: renew the certificate over EST with the current one (optionally with a new key)',
  usage: `Usage: hallmark agent reenroll --server URL --trust ROOT.pem --key FILE|pkcs11:URI --out DIR [--new-key FILE|pkcs11:URI]
                              [--if-due [--renew-after 66%]]

Authenticates with DIR/cert.pem (+ DIR/chain.pem) and --key over TLS, asks for a new certificate for
the same key — or for --new-key (rekey; the product must allow it) — checks it like enroll does and
replaces DIR/cert.pem and DIR/chain.pem. Neither key is written.
  ${KEY_HELP}
  --new-key FILE|URI       rekey: the new certificate is for this key (same forms as --key)
  ${COMMON}
  --out DIR                the state directory of the earlier enrolment
  --if-due                 renew only inside the renewal window: after --renew-after of the lifetime
                           (default 66%) and when the server agrees; otherwise print when, exit 0`,
  options: { ...common, 'new-key': { type: 'string' }, 'if-due': { type: 'boolean' }, 'renew-after': { type: 'string' } },
  async run(args) {
    const usage = this.usage;
    return guarded(this.name, async () => {
      const keySpec = required(args, 'key', usage);
      const stateDir = required(args, 'out', usage);
      const server = serverOptions(args, usage);
      const key = await openKey(args, keySpec);
      let newKey: DeviceKey | undefined;
      try {
        const newSpec = str(args, 'new-key');
        if (newSpec !== undefined) newKey = await openKey(args, newSpec);
        if (flag(args, 'if-due')) {
          const text = str(args, 'renew-after');
          const m = text === undefined ? undefined : /^(\d{1,2})%?$/.exec(text.trim());
          if (text !== undefined && !m) throw new EstClientError('EST_BAD_OPTIONS', `--renew-after must be a percentage 0-99: ${JSON.stringify(text)}`);
          const outcome = await renewIfDue({ ...server, key, stateDir, newKey, renewAfterPercent: m ? Number(m[1]) : undefined });
          if (outcome.renewed) report(outcome.info, flag(args, 'json'), 'Re-enrolled');
          else if (flag(args, 'json')) process.stdout.write(`${JSON.stringify({ renewed: false, dueAt: outcome.dueAt.toISOString(), reason: outcome.reason })}\n`);
          else process.stdout.write(`Not renewed: ${outcome.reason}\n`);
          return 0;
        }
        const result = await reenrol({ ...server, key, stateDir, newKey });
        report(result, flag(args, 'json'), 'Re-enrolled');
        return 0;
      } finally {
        await newKey?.close();
        await key.close();
      }
    });
  },
};

/** "30s", "2m", "500ms", "1h" or plain seconds. */
function parseDuration(text: string, what: string): number {
  const m = /^(\d{1,7})(ms|s|m|h)?$/.exec(text.trim());
  if (!m) throw new UsageError(`${what} must be a duration such as 30s, 2m, 500ms: ${JSON.stringify(text)}`);
  const n = Number(m[1]);
  const ms = n * ({ ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] ?? 's'] ?? 1000);
  if (ms < 100) throw new UsageError(`${what} must be at least 100ms`);
  return ms;
}

export const agentRunCommand: Command = {
  name: 'agent run',
  summary: 'device side: enrol if needed, stay connected to the MQTT broker, heartbeat, renew and reconnect',
  usage: `Usage: hallmark agent run --server URL --broker mqtts://HOST:PORT --trust ROOT.pem --key FILE|pkcs11:URI --out DIR
                         [--claim ID:SECRET | --claim-file FILE] [--heartbeat 30s] [--renew-after 66%]

Runs until SIGINT or SIGTERM. When DIR holds no certificate it enrols first (with the claim when given,
else with the registered key alone). Then it connects to the broker over TLS with DIR/cert.pem and the
key, trusting ONLY --trust (a broker whose certificate does not chain to it is refused), publishes
{"udid","at","serial"} to devices/<UDID>/heartbeat every --heartbeat (QoS 1), renews the certificate
inside its window (after --renew-after of its lifetime, when the server agrees) and reconnects with it,
and reconnects with backoff (1 s doubling up to 60 s) whenever the connection drops or is refused.
Events are printed one a line (--json: JSON objects).
  ${KEY_HELP}
  ${COMMON}
  --broker URL             mqtts://HOST[:PORT] (default port 8883)
  --out DIR                state directory (cert.pem, chain.pem, enrolment.json)
  --claim ID:SECRET        a claim for the first enrolment; better --claim-file FILE or HALLMARK_CLAIM
  --heartbeat DURATION     e.g. 30s (default), 2m, 500ms
  --renew-after N%         the device's renewal threshold (default 66%)`,
  options: { ...common, broker: { type: 'string' }, claim: { type: 'string' }, 'claim-file': { type: 'string' }, heartbeat: { type: 'string' }, 'renew-after': { type: 'string' } },
  async run(args) {
    const usage = this.usage;
    return guarded(this.name, async () => {
      const keySpec = required(args, 'key', usage);
      const stateDir = required(args, 'out', usage);
      const broker = required(args, 'broker', usage);
      const server = serverOptions(args, usage);
      const claimFile = str(args, 'claim-file');
      const claim = str(args, 'claim') ?? (claimFile ? secretFromFile(claimFile, 'the claim file') : process.env.HALLMARK_CLAIM || undefined);
      if (claim !== undefined && !/^[^:\s]+:\S+$/.test(claim)) throw new UsageError('the claim must be ID:SECRET');
      const heartbeatText = str(args, 'heartbeat');
      const heartbeatMs = heartbeatText === undefined ? undefined : parseDuration(heartbeatText, '--heartbeat');
      const renewText = str(args, 'renew-after');
      const m = renewText === undefined ? undefined : /^(\d{1,2})%?$/.exec(renewText.trim());
      if (renewText !== undefined && !m) throw new UsageError(`--renew-after must be a percentage 0-99: ${JSON.stringify(renewText)}`);
      if (!/^mqtts:\/\//i.test(broker)) throw new UsageError(`--broker must be mqtts://HOST:PORT\n\n${usage}`);
      const json = flag(args, 'json');
      const key = await openKey(args, keySpec);
      try {
        const agent = runAgent({ ...server, key, stateDir, broker, claim, heartbeatMs, renewAfterPercent: m ? Number(m[1]) : undefined });
        const print = (event: string, text: string, data: Record<string, unknown>): void => {
          if (json) out(JSON.stringify({ event, at: new Date().toISOString(), ...data }));
          else out(`${new Date().toISOString()} ${text}`);
        };
        const brief = (i: EnrolmentInfo): Record<string, unknown> => ({ udid: i.udid, serial: i.serial, notAfter: i.notAfter, authenticator: i.authenticator });
        agent.events.on('enrolled', (i: EnrolmentInfo) => print('enrolled', `enrolled ${i.udid} (${i.authenticator}), serial ${i.serial}, valid until ${i.notAfter}`, brief(i)));
        agent.events.on('renewed', (i: EnrolmentInfo) => print('renewed', `renewed: serial ${i.serial}, valid until ${i.notAfter}; reconnecting`, brief(i)));
        agent.events.on('connected', (c: ConnectedEvent) => print('connected', `connected to ${c.broker} as ${c.udid} (serial ${c.serial})`, { ...c }));
        agent.events.on('heartbeat', (h: HeartbeatEvent) => print('heartbeat', `heartbeat ${h.topic}`, { ...h }));
        agent.events.on('refused', (r: RefusedEvent) => print('refused', `refused (${r.by}): ${r.reason}`, { ...r }));
        agent.events.on('error', (err: Error) => {
          const code = (err as { code?: unknown }).code;
          if (json) out(JSON.stringify({ event: 'error', at: new Date().toISOString(), message: err.message, ...(code !== undefined ? { code } : {}) }));
          else info(`hallmark agent run: ${err.message}${code !== undefined ? ` [${String(code)}]` : ''}`);
        });
        const signal = await new Promise<NodeJS.Signals>((resolve) => {
          const on = (s: NodeJS.Signals): void => { process.off('SIGINT', on); process.off('SIGTERM', on); resolve(s); };
          process.on('SIGINT', on);
          process.on('SIGTERM', on);
        });
        info(`hallmark agent run: ${signal}, stopping`);
        await agent.stop();
        return 0;
      } finally {
        await key.close();
      }
    });
  },
};
