// hallmark broker mosquitto: a Mosquitto configuration for devices with Hallmark identities;
// hallmark broker mosquitto-crl: rewrite its CRL and ACL files and make the running broker reload them.

import { MOSQUITTO_FILES, refreshMosquittoCrl, writeMosquittoConfig } from '../../broker/mosquitto.js';
import { withAuthority } from '../context.js';
import { HallmarkError } from '../../errors.js';
import { actor, flag, info, intOption, list, out, required, str, type Command } from '../io.js';

export const brokerMosquittoCommand: Command = {
  name: 'broker mosquitto',
  summary: 'write a Mosquitto configuration: mutual TLS with Hallmark identities, per-product topic ACL, CRL, instant disconnection',
  usage: `Usage: hallmark broker mosquitto --out DIR [--port 8883] [--host 127.0.0.1] [--dns NAME]... [--ip ADDR]...
                                 [--user NAME] [--ca NAME] [--acl auto|per-device]
                                 [--admin-port N | --dynsec-plugin FILE | --no-dynsec]
                                 [--home DIR] [--passphrase-file FILE]

Writes into DIR: ${Object.values(MOSQUITTO_FILES).filter((f) => f !== MOSQUITTO_FILES.pid && f !== MOSQUITTO_FILES.socket).join(', ')}.
The TLS listener requires a client certificate from Hallmark's CAs; the MQTT username is the
certificate's CN (the device UDID); the ACL gives each device its product's policy ("hallmark product
policy"; by default write devices/<UDID>/# and read devices/<UDID>/commands/#) and a suspended device
nothing. --acl auto (default): when every product has the same policy, pattern lines serve the whole
fleet (a new device needs no change); per-device: one block per registry device, always (a certificate
whose CN names no registry device gets nothing; a new device waits for the next sync). A server certificate is issued for the broker (localhost, 127.0.0.1, plus --dns/--ip) and its
private key written to DIR/${MOSQUITTO_FILES.key} with mode 0600 — the broker's own key, not a CA key.
--user: the user Mosquitto switches to when started as root (default: you).
With Mosquitto's dynamic security plugin (found in the usual places, or --dynsec-plugin FILE) an admin
listener on the Unix socket DIR/${MOSQUITTO_FILES.socket} (or 127.0.0.1:--admin-port) lets "hallmark serve" disconnect
revoked, suspended and decommissioned devices at once; its password is in DIR/${MOSQUITTO_FILES.admin} (0600).
Keep DIR current with "hallmark serve --broker-dir DIR" (or "hallmark broker mosquitto-crl" from cron).
Run: mosquitto -c DIR/${MOSQUITTO_FILES.config}`,
  options: {
    out: { type: 'string' }, port: { type: 'string' }, host: { type: 'string' }, dns: { type: 'string', multiple: true }, ip: { type: 'string', multiple: true },
    user: { type: 'string' }, ca: { type: 'string' }, acl: { type: 'string' }, 'admin-port': { type: 'string' }, 'dynsec-plugin': { type: 'string' }, 'no-dynsec': { type: 'boolean' },
    'passphrase-file': { type: 'string' },
  },
  async run(args) {
    const dir = required(args, 'out', this.usage);
    if (flag(args, 'no-dynsec') && (str(args, 'dynsec-plugin') !== undefined || str(args, 'admin-port') !== undefined)) {
      throw new HallmarkError('BAD_REQUEST', '--no-dynsec goes with neither --dynsec-plugin nor --admin-port');
    }
    const acl = str(args, 'acl') ?? 'auto';
    if (acl !== 'auto' && acl !== 'per-device') throw new HallmarkError('BAD_REQUEST', `--acl is auto or per-device, not ${JSON.stringify(acl)}`);
    return withAuthority(args, async (authority) => {
      const config = await writeMosquittoConfig(authority, {
        acl,
        dir, port: intOption(args, 'port'), host: str(args, 'host'), dnsNames: list(args, 'dns'), ipAddresses: list(args, 'ip'),
        user: str(args, 'user'), ca: str(args, 'ca'), adminPort: intOption(args, 'admin-port'),
        dynsecPlugin: flag(args, 'no-dynsec') ? false : str(args, 'dynsec-plugin'), actor: actor(),
      });
      out(`Mosquitto configuration written to ${config.dir}`);
      out(`  broker certificate ${config.server.serial} (${config.server.subject}), key ${config.files.key} (0600)`);
      out(`  CRLs of ${config.crlCas.join(', ')} in ${config.files.crl}`);
      for (const w of config.crlSkipped) info(`  warning: no CRL for ${w} (Mosquitto refuses its devices)`);
      out(`  ACL ${config.files.acl}: ${config.acl.layout === 'uniform' ? 'one policy for every product (patterns)' : `per device (${config.acl.devices} devices)`}`);
      for (const w of config.acl.warnings) info(`  warning: ${w}`);
      if (config.admin) out(`  admin listener ${config.admin.socket ?? `127.0.0.1:${config.admin.port}`} (${config.admin.plugin}); password in ${config.files.admin} (0600)`);
      else info(`  ${flag(args, 'no-dynsec') ? 'no admin listener (--no-dynsec)' : 'no dynamic security plugin found'}: revoked and suspended devices are refused at their next connection, open sessions are not cut${flag(args, 'no-dynsec') ? '' : ' (see --dynsec-plugin)'}`);
      out(`Run: mosquitto -c ${config.files.config}`);
      return 0;
    });
  },
};

export const brokerMosquittoCrlCommand: Command = {
  name: 'broker mosquitto-crl',
  summary: 'rewrite a Mosquitto configuration\'s CRL and ACL files and signal the broker to reload them',
  usage: `Usage: hallmark broker mosquitto-crl --dir DIR [--home DIR] [--passphrase-file FILE]

Rewrites DIR/${MOSQUITTO_FILES.crl} atomically with the current full CRLs of the issuing CAs (a new full CRL
is made when revocations are waiting in the delta) and DIR/${MOSQUITTO_FILES.acl} from the registry (products'
policies, suspended devices), and sends SIGHUP to the pid in DIR/${MOSQUITTO_FILES.pid}. It disconnects nobody:
"hallmark serve --broker-dir DIR" does that, and keeps DIR current.
Run it at least daily (the CRLs expire) unless "hallmark serve --broker-dir DIR" keeps DIR current.`,
  options: { dir: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const dir = required(args, 'dir', this.usage);
    return withAuthority(args, async (authority) => {
      const r = await refreshMosquittoCrl(authority, dir);
      out(`CRL file rewritten: ${r.cas.map((c, i) => `${c} #${r.numbers[i]}`).join(', ')}`);
      if (r.acl) out(`ACL ${r.acl.changed ? 'rewritten' : 'unchanged'}: ${r.acl.layout === 'uniform' ? `one policy for every product, ${r.acl.blocked} device(s) blocked` : `per device, ${r.acl.devices} device(s)`}`);
      for (const w of r.acl?.warnings ?? []) info(`warning: ${w}`);
      for (const w of r.crlSkipped ?? []) info(`warning: no CRL for ${w} (Mosquitto refuses its devices)`);
      if (r.signalled !== undefined) out(`SIGHUP sent to mosquitto (pid ${r.signalled})${r.reloadMs !== undefined ? `; reload seen through the admin listener after ${Math.round(r.reloadMs)} ms` : ''}`);
      else info('No running mosquitto found (no live pid in the pid file): nothing signalled.');
      return 0;
    });
  },
};
