/* ks-collector tag: keeps the Kuaishou click id (callback) and reports conversions. */
(function (window, document) {
  var previous = window.kstag || {};
  if (previous.loaded) return;

  // Options

  // Without currentScript (old browsers), the first script that looks like this tag.
  var script = document.currentScript || document.querySelector('script[src$="/tag.js"]') || {};
  // data-endpoint, data-ttl-days, data-field-name on the script tag.
  var options = script.dataset || {};
  // By default the origin the tag was loaded from.
  var endpoint =
    (options.endpoint || (script.src || '').split('/').slice(0, 3).join('/')).replace(/\/+$/, '') +
    '/collect';
  var ttlDays = +options.ttlDays;
  var ttl = (ttlDays > 0 ? ttlDays : 7) * 864e5;
  var fieldName = options.fieldName || 'ks_callback';

  // Stored under the keys 'ks_cb' (click id) and 'ks_q' (retry queue).
  var QUEUE_SIZE = 20;
  var QUEUE_AGE = 864e5;
  var SEND_LIMIT = 5;

  // Helpers

  function now() {
    return +new Date();
  }

  // Nothing the tag does may throw into the page: each way in (a kstag call, a page event, a
  // reply) runs through this, so a page that breaks a global loses at most that one report.
  function guard(fn) {
    return function (a, b) {
      try {
        fn(a, b);
      } catch (e) {}
    };
  }

  // A form's controls shadow its properties: <input name="appendChild"> is form.appendChild. So
  // forms are only handled through these, and never walked up from: a control named parentNode
  // would turn node.parentNode into a loop.
  var element = Element.prototype;

  // The attribute's value on the innermost element with it that holds (or is) the event's target.
  function marked(e, name) {
    var all = document.querySelectorAll('[' + name + ']'), i = all.length;
    while (i--) {
      if (element.contains.call(all[i], e.target)) return element.getAttribute.call(all[i], name);
    }
  }

  // Storage: localStorage, else a first-party cookie, else this page view's memory.
  // Private modes, disabled cookies and sandboxed iframes make these accesses throw.

  var memory = {};

  function load(key) {
    var value;
    try {
      value = localStorage.getItem(key);
    } catch (e) {}
    try {
      // Without such a cookie, null[2] throws.
      value = value || decodeURIComponent(document.cookie.match('(^|; )' + key + '=([^;]*)')[2]);
    } catch (e) {}
    return value || memory[key];
  }

  // Only values given a maxAge (seconds) may go to a cookie: the queue is too big for one.
  function save(key, value, maxAge) {
    memory[key] = value;
    try {
      localStorage.setItem(key, value);
    } catch (e) {
      try {
        if (maxAge) {
          document.cookie = key + '=' + encodeURIComponent(value) + ';path=/;max-age=' + maxAge;
        }
      } catch (e2) {}
    }
  }

  // Sending and the retry queue. A queued item is {e: event, t: time of the action, n: sends so
  // far}. A send by beacon or image, whose answer is unseen, counts SEND_LIMIT - 2 more: such an
  // event is sent once more at most.

  // The queue is read without Array methods, which pages replace with broken versions; anything
  // stored there that is not a list of items counts as empty.
  function pending(exceptId) {
    var items = [];
    try {
      var saved = JSON.parse(load('ks_q'));
      for (var i = 0; i < saved.length; i++) {
        var item = saved[i];
        if (item.e.id !== exceptId && now() - item.t < QUEUE_AGE &&
            item.n < SEND_LIMIT) items[items.length] = item;
      }
    } catch (e) {}
    return items;
  }

  // Rewrites the queue without the event `id`, and with `item` (that event's new state) if given.
  function keep(id, item) {
    var items = pending(id);
    if (item) items[items.length] = item; // not push: pages replace it with broken versions
    items = items.slice(-QUEUE_SIZE);
    // Prototype.js gives arrays a toJSON that returns a string, which JSON.stringify would save.
    items.toJSON = 0;
    save('ks_q', JSON.stringify(items));
  }

  // Sends a queued item's event and saves the item with its new count and blind flag: it stays
  // queued until an answer says it is done.
  function send(item) {
    var event = item.e;
    // The first send is the action itself; a re-send says how long ago the action was.
    event.age_ms = item.n++ && Math.max(0, now() - item.t);
    var body = JSON.stringify(event);

    // A string body makes this a CORS simple request (text/plain): no preflight. Cross-origin,
    // the browser sends no cookies and only the page's origin as the referrer. A network failure
    // rejects and leaves the event queued; the empty handler keeps that rejection from reaching
    // the page as an unhandled one.
    try {
      fetch(endpoint, {method: 'POST', body: body, keepalive: true}).then(guard(function (answer) {
        // 2xx is committed; any other 4xx but 408 and 429 can never be accepted.
        if (/^(2|4(?!08|29))/.test(answer.status)) keep(event.id);
      }), function () {});
    } catch (e) {
      // Neither of these shows the answer: the next page load sends the event once more.
      item.n += SEND_LIMIT - 2;
      try {
        // false: the browser did not queue it (too big, or too much in flight), so the image.
        if (!navigator.sendBeacon(endpoint, body)) throw 0;
      } catch (e2) {
        try {
          var image = new Image();
          // The origin, not the page's URL: the collector checks it against its allowlist.
          image.referrerPolicy = 'origin';
          image.src = endpoint + '?d=' + encodeURIComponent(body);
        } catch (e3) {}
      }
    }
    keep(event.id, item);
  }

  var flush = guard(function () {
    var items = pending();
    for (var i = 0; i < items.length; i++) send(items[i]);
  });

  var track = guard(function (type, props) {
    if (!callback || !type) return;

    var id = '', bytes = [], i = 32;
    try {
      bytes = crypto.getRandomValues(new Uint8Array(i));
    } catch (e) {}
    // A hex digit from each random byte, or from Math.random alone where crypto is missing.
    while (i--) id += (bytes[i] % 16 ^ Math.random() * 16).toString(16);
    var event = {v: 1, id: id, type: '' + type, callback: callback};
    var leadId = props && props.lead_id;
    if (leadId != null && (leadId += '') && !leadId[128]) event.lead_id = leadId;
    send({e: event, t: now(), n: 0});
  });

  // Page events

  function fillField(form) {
    var input = element.querySelector.call(form, 'input[name="' + fieldName + '"]');
    if (!input) {
      input = element.appendChild.call(form, document.createElement('input'));
      input.type = 'hidden';
      input.name = fieldName;
    }
    input.value = callback;
  }

  var fillForms = guard(function () {
    var forms = document.forms, i = forms.length;
    while (i--) fillField(forms[i]);
  });

  // Event types a click or copy already reported in this page view: a double tap, or a copy
  // after a click on the same WeChat ID, is one conversion.
  var clicked = {};

  function once(type) {
    if (!clicked[type]) track(clicked[type] = type);
  }

  // A click on a data-ks-wechat element (the usual "copy WeChat ID" button), or a copy whose
  // selection starts in one: Chromium and WebKit aim copy at that element (or the input).
  function wechatCopy(e) {
    if (marked(e, 'data-ks-wechat') != null) once('wechat_copy');
  }

  // Start

  // The click id: the first callback in the query or a hash route that is neither empty nor a
  // macro Kuaishou left unreplaced, decoded once and without turning '+' into a space (click ids
  // carry a raw '+').
  var fromUrl;
  (location.search + location.hash).replace(/[?&#]callback=([^&#]*)/g, function (all, value) {
    try {
      value = decodeURIComponent(value);
    } catch (e) {}
    if (!fromUrl && !/^(__[A-Z0-9_]+__)?$/.test(value)) fromUrl = value;
  });
  // Kept as 'expiry|click id', plain text: pages that change how JSON treats arrays (Prototype.js
  // makes an array serialize to a string) cannot garble it.
  var saved = /^(\d+)\|([^]+)/.exec(load('ks_cb')) || [];
  var stored = saved[1] > now() && saved[2];
  var callback = fromUrl || stored;
  if (fromUrl) save('ks_cb', now() + ttl + '|' + fromUrl, ttl / 1e3 | 0);

  function kstag(command, type, props) {
    if (command === 'track') track(type, props);
  }
  kstag.loaded = true;
  window.kstag = kstag;

  if (callback) {
    // Capture phase: forms and buttons whose own handlers stop propagation still count.
    document.addEventListener('submit', guard(function (e) {
      fillField(e.target);
      track('form');
    }), true);

    document.addEventListener('click', guard(function (e) {
      once(marked(e, 'data-ks-track'));
      wechatCopy(e);
    }), true);

    document.addEventListener('copy', guard(wechatCopy), true);

    fillForms();
    try {
      new MutationObserver(fillForms).observe(document, {
        childList: true, subtree: true
      });
    } catch (e) {}
  }
  flush();
  if (fromUrl && fromUrl !== stored) track('landing');
  // The page's queue may hold anything: one bad call must not stop the others.
  var calls = previous.q || [];
  for (var i = 0; i < calls.length; i++) {
    try {
      kstag.apply(0, calls[i]);
    } catch (e) {}
  }
  window.addEventListener('online', flush);
})(window, document);
