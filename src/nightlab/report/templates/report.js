(function () {
  function key(cell) { return cell ? cell.getAttribute('data-v') || '' : ''; }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var asc = th.getAttribute('data-dir') !== 'asc';
        th.setAttribute('data-dir', asc ? 'asc' : 'desc');
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          var nx = parseFloat(x), ny = parseFloat(y);
          if (x === '' || y === '') { return x === y ? 0 : (x === '' ? 1 : -1); }
          var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var boxes = document.querySelectorAll('.filters input[type=checkbox]');
  function applyFilter() {
    var shown = {};
    boxes.forEach(function (b) { shown[b.value] = b.checked; });
    document.querySelectorAll('#experiments tbody tr').forEach(function (tr) {
      tr.style.display = shown[tr.getAttribute('data-status')] === false ? 'none' : '';
    });
  }
  boxes.forEach(function (b) { b.addEventListener('change', applyFilter); });
  applyFilter();
  document.body.setAttribute('data-ready', 'yes');
})();
